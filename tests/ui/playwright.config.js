// Playwright for copilot studio: Debian's Chromium (no browser download), one worker (the tests share one cluster
// and one tiny model), against the studio scripts/studio-test starts (STUDIO_URL).
const { defineConfig } = require('@playwright/test');

module.exports = defineConfig({
  testDir: '.',
  testMatch: '*.spec.js',
  timeout: 240_000,
  expect: { timeout: 15_000 },
  workers: 1,
  retries: 0,
  reporter: [['list']],
  outputDir: process.env.STUDIO_TEST_OUT || 'test-results',
  use: {
    baseURL: process.env.STUDIO_URL || 'http://127.0.0.1:8781',
    acceptDownloads: true,
    viewport: { width: 1280, height: 900 },
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: '/usr/bin/chromium',
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    },
  },
});
