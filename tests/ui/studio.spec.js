// copilot studio, used the way a person uses it: log in, ask, edit and run, read the chart, download CSV, see a
// refused write's error, cancel a slow query, and check that one role never sees another's history.
// The tiny model's answers are often wrong or refused: where the model decides, a SQL answer and a shown error are
// both accepted; everything after that uses SQL the test types itself, so it is deterministic.
const { test, expect } = require('@playwright/test');
const fs = require('fs');

const USER1 = process.env.STUDIO_USER1 || 'alice';
const PASS1 = process.env.STUDIO_PASS1 || 'alice-pw';
const USER2 = process.env.STUDIO_USER2 || 'bob';
const PASS2 = process.env.STUDIO_PASS2 || 'bob-pw';
const BAR_SQL = 'SELECT country, count(*) FROM singer GROUP BY country';
const MODEL_WAIT = 180_000;

// Every request the page makes stays on the studio (offline: no CDN), and no script error happens.
function watch(page, baseURL) {
  const foreign = [];
  const errors = [];
  page.on('request', (r) => {
    if (!r.url().startsWith(baseURL) && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) foreign.push(r.url());
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    // 4xx answers (a refused write, a cancelled query) are logged by Chromium as failed loads: those are expected.
    if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) errors.push(m.text());
  });
  return { foreign, errors };
}

async function login(page, role, password) {
  await page.goto('/');
  await page.fill('#role', role);
  await page.fill('#password', password);
  await page.click('#login');
  await expect(page.locator('#who')).toContainText(role + ' @ ');
}

async function setSql(page, sql) {
  await page.fill('#sql', sql);
}

async function run(page, sql) {
  await setSql(page, sql);
  await page.click('#run');
  await expect(page.locator('#progress')).toBeHidden({ timeout: 60_000 });
}

// Pixels on the chart's canvas that are not transparent/white, and a hash of them (to tell two drawings apart).
async function canvasInk(page) {
  return page.evaluate(() => {
    const c = document.getElementById('chart');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let ink = 0, accent = 0, hash = 0;
    for (let i = 0; i < d.length; i += 4) {
      const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
      if (a > 0 && !(r > 240 && g > 240 && b > 240)) ink++;
      if (a > 200 && Math.abs(r - 0x2f) < 30 && Math.abs(g - 0x6f) < 30 && Math.abs(b - 0xde) < 30) accent++;
      hash = (hash * 31 + r + g * 7 + b * 13 + a) >>> 0;
    }
    return { ink, accent, hash };
  });
}

async function askAndSettle(page, question, { enter = false } = {}) {
  await page.fill('#question', question);
  if (enter) await page.press('#question', 'Enter');
  else await page.click('#ask');
  await expect(page.locator('#progress')).toBeVisible();
  // The page sets body[data-flow] until the answer has been asked, explained and run.
  await page.waitForFunction(() => !document.body.dataset.flow, null, { timeout: MODEL_WAIT });
  // Either the SQL answer is in the editor, or the refusal/error is shown with its SQLSTATE.
  const sql = await page.inputValue('#sql');
  const errorShown = await page.locator('#error').isVisible();
  if (errorShown) await expect(page.locator('#error-sqlstate')).toHaveText(/^[0-9A-Z]{5}$/);
  expect(/\bselect\b/i.test(sql) || errorShown, 'a SQL answer or a shown error').toBeTruthy();
  return { sql, errorShown };
}

test('a wrong password is refused with the server\'s error', async ({ page }) => {
  await page.goto('/');
  await page.fill('#role', USER1);
  await page.fill('#password', 'not-the-password');
  await page.click('#login');
  await expect(page.locator('#login-error')).toContainText('28P01');
  await expect(page.locator('#login-error')).toContainText('password authentication failed');
  await expect(page.locator('#who')).toHaveCount(0);
});

test('ask a question: the SQL answer or a shown refusal', async ({ page, baseURL }) => {
  const w = watch(page, baseURL);
  await login(page, USER1, PASS1);
  const { sql, errorShown } = await askAndSettle(page, 'What is the average age of singers?');
  if (!errorShown) {
    // An answer was run at once: its rows (or its run error) and its explanation are on the page.
    expect(await page.locator('#result').isVisible() || await page.locator('#error').isVisible()).toBeTruthy();
    await expect(page.locator('#explanation')).not.toBeEmpty();
    await expect(page.locator('#thread li')).toHaveCount(1);
    expect(sql.length).toBeGreaterThan(8);
  }
  // The question is in this role's history either way (the history writer records it asynchronously).
  await expect(async () => {
    await page.click('#refresh-history');
    await expect(page.locator('#history .q').first()).toHaveText('What is the average age of singers?', { timeout: 1000 });
  }).toPass({ timeout: 20_000 });
  expect(w.foreign).toEqual([]);
  expect(w.errors).toEqual([]);
});

test('edit and run SQL: table, chart drawn, kinds switch, explanation, CSV', async ({ page, baseURL }) => {
  const w = watch(page, baseURL);
  await login(page, USER1, PASS1);
  await run(page, BAR_SQL);
  await expect(page.locator('#error')).toBeHidden();
  await expect(page.locator('#rows tbody tr')).toHaveCount(3);
  await expect(page.locator('#rows thead th')).toHaveText(['count', 'country']);
  await expect(page.locator('#rows tbody')).toContainText('France');
  // The SQL is highlighted.
  await expect(page.locator('#sql-highlight .tok-keyword').first()).toHaveText('SELECT');
  // One category + one number: a bar chart, actually drawn.
  await expect(page.locator('#chart-kind')).toHaveValue('bar');
  const bar = await canvasInk(page);
  expect(bar.accent, 'bars in the accent colour').toBeGreaterThan(500);
  // Switch to a line, then a big number, then none.
  await page.selectOption('#chart-kind', 'line');
  const line = await canvasInk(page);
  expect(line.ink).toBeGreaterThan(200);
  expect(line.hash).not.toEqual(bar.hash);
  await page.selectOption('#chart-kind', 'number');
  await expect(page.locator('#big-number')).toBeVisible();
  await expect(page.locator('#big-number')).toHaveText(/^\d+$/);
  await page.selectOption('#chart-kind', 'none');
  await expect(page.locator('#chart-area')).toBeHidden();
  // Explanation of the edited SQL, from copilot.explain.
  await page.click('#explain');
  await expect(page.locator('#explanation')).toContainText('Groups by');
  // CSV of the rows.
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#csv')]);
  const csv = fs.readFileSync(await download.path(), 'utf8');
  expect(csv.split('\r\n')[0]).toBe('count,country');
  expect(csv).toContain('4,France\r\n');
  expect(csv.trim().split('\r\n')).toHaveLength(4);
  // A single value picks the big number by itself; two numbers a scatter.
  await run(page, 'SELECT count(*) AS singers FROM singer');
  await expect(page.locator('#chart-kind')).toHaveValue('number');
  await expect(page.locator('#big-number')).toHaveText('6');
  await run(page, 'SELECT age, singer_id FROM singer');
  await expect(page.locator('#chart-kind')).toHaveValue('scatter');
  expect((await canvasInk(page)).accent).toBeGreaterThan(20);
  expect(w.foreign).toEqual([]);
  expect(w.errors).toEqual([]);
});

test('many rows are paginated, and the row cap\'s NOTICE is shown', async ({ page }) => {
  await login(page, USER1, PASS1);
  await run(page, 'SELECT g AS n, g * 2 AS twice FROM generate_series(1, 60) g');
  await expect(page.locator('#row-count')).toHaveText('60 rows');
  await expect(page.locator('#rows tbody tr')).toHaveCount(25);
  await expect(page.locator('#page-info')).toHaveText('page 1 of 3');
  await page.click('#next-page');
  await page.click('#next-page');
  await expect(page.locator('#page-info')).toHaveText('page 3 of 3');
  await expect(page.locator('#rows tbody tr')).toHaveCount(10);
  await expect(page.locator('#rows tbody tr').first()).toContainText('51');
  // Past copilot.max_rows (1000) the rows are cut and the server's NOTICE is shown.
  await run(page, 'SELECT g FROM generate_series(1, 1500) g');
  await expect(page.locator('#row-count')).toHaveText('1000 rows (cut at the row limit)');
  await expect(page.locator('#notice')).toContainText('copilot.max_rows');
  await expect(page.locator('#page-info')).toHaveText('page 1 of 40');
});

test('a write is refused and shows SQLSTATE, message and DETAIL; injection text stays text', async ({ page }) => {
  await login(page, USER1, PASS1);
  await run(page, 'DELETE FROM singer');
  await expect(page.locator('#error')).toBeVisible();
  await expect(page.locator('#error-sqlstate')).toHaveText('25006');
  await expect(page.locator('#error-message')).toContainText('refused');
  await expect(page.locator('#error-detail')).toContainText('DELETE FROM singer');
  await run(page, 'SELECT 1; DROP TABLE singer');
  await expect(page.locator('#error')).toBeVisible();
  await expect(page.locator('#error-sqlstate')).toHaveText(/^[0-9A-Z]{5}$/);
  // A question made of SQL is only a question.
  await askAndSettle(page, "'); DROP TABLE singer; --");
  await run(page, 'SELECT count(*) AS singers FROM singer');
  await expect(page.locator('#big-number')).toHaveText('6');
});

test('adversarial requests: no or a wrong CSRF token, an oversized body, no session', async ({ page, request }) => {
  await login(page, USER1, PASS1);
  const statuses = await page.evaluate(async () => {
    const post = (headers, body) => fetch('/api/run', { method: 'POST', headers: { 'Content-Type': 'application/json', ...headers }, body })
      .then((r) => r.status);
    const token = document.querySelector('meta[name="csrf-token"]').content;
    return {
      none: await post({}, JSON.stringify({ sql: 'SELECT 1' })),
      wrong: await post({ 'X-CSRF-Token': 'f'.repeat(64) }, JSON.stringify({ sql: 'SELECT 1' })),
      huge: await post({ 'X-CSRF-Token': token }, JSON.stringify({ sql: 'SELECT ' + '1'.repeat(70_000) })),
      right: await post({ 'X-CSRF-Token': token }, JSON.stringify({ sql: 'SELECT 1 AS one' })),
    };
  });
  expect(statuses).toEqual({ none: 403, wrong: 403, huge: 413, right: 200 });
  // Without the session cookie (another client), nothing is answered.
  const r = await request.post('/api/run', { data: { sql: 'SELECT 1' }, headers: { 'X-CSRF-Token': 'x' } });
  expect(r.status()).toBe(401);
  const forged = await request.post('/login', { form: { role: USER1, password: PASS1, csrf: 'forged' } });
  expect(forged.status()).toBe(403);
});

test('cancel stops a slow query on the server', async ({ page }) => {
  await login(page, USER1, PASS1);
  await setSql(page, 'SELECT pg_sleep(30)');
  const started = Date.now();
  await page.click('#run');
  await expect(page.locator('#progress')).toBeVisible();
  await page.waitForTimeout(1000);
  await page.click('#cancel');
  await expect(page.locator('#error-sqlstate')).toHaveText('57014', { timeout: 10_000 });
  await expect(page.locator('#error-message')).toContainText('cancel');
  await expect(page.locator('#progress')).toBeHidden();
  expect(Date.now() - started, 'ended long before the 30 s sleep').toBeLessThan(10_000);
  // The connection is still usable.
  await run(page, 'SELECT 1 AS one');
  await expect(page.locator('#big-number')).toHaveText('1');
});

test('feedback and follow-up on a history row', async ({ page }) => {
  await login(page, USER1, PASS1);
  const { errorShown } = await askAndSettle(page, 'How many concerts are there?');
  if (!errorShown) {
    // An answered question starts a thread: the next question follows up on it.
    await expect(page.locator('#thread li')).toHaveCount(1);
    await expect(page.locator('#question-label')).toHaveText('Ask a follow-up question');
    await askAndSettle(page, 'Only those in 2014.', { enter: true });
  }
  await page.click('#refresh-history');
  const item = page.locator('#history .history-item').first();
  const id = await item.getAttribute('data-id');
  await item.click();
  await expect(page.locator('#thumbs-down')).toBeEnabled();
  await page.click('#thumbs-down');
  await expect(page.locator('#feedback-status')).toContainText('Thanks');
  await expect(async () => {
    await page.click('#refresh-history');
    await expect(page.locator(`#history .history-item[data-id="${id}"]`)).toContainText('✗ wrong', { timeout: 1000 });
  }).toPass({ timeout: 20_000 });
  // "Correct this SQL": the editor's SQL goes to copilot.feedback as the correction (stored as a verified example,
  // or, for a row that continues a conversation, recorded with the server's NOTICE saying why not).
  await page.locator(`#history .history-item[data-id="${id}"]`).click();
  await setSql(page, 'SELECT count(*) FROM concert');
  await page.click('#correct');
  await expect(page.locator('#feedback-status')).toContainText('Thanks');
  const status = await page.locator('#feedback-status').textContent();
  if (!/verified example #\d+/.test(status)) await expect(page.locator('#notice')).toContainText('conversation');
});

test('a second role cannot see the first role\'s history', async ({ browser }) => {
  const marker = 'marker ' + Date.now() + ': how many stadiums are there?';
  const a = await browser.newContext();
  const pa = await a.newPage();
  await login(pa, USER1, PASS1);
  await askAndSettle(pa, marker);
  // The history writer records asks asynchronously: refresh until it is there.
  await expect(async () => {
    await pa.click('#refresh-history');
    await expect(pa.locator('#history .q').first()).toHaveText(marker, { timeout: 1000 });
  }).toPass({ timeout: 20_000 });
  const b = await browser.newContext();
  const pb = await b.newPage();
  await login(pb, USER2, PASS2);
  await pb.click('#refresh-history');
  await expect(pb.locator('#history')).not.toContainText(marker);
  const roles = await pb.evaluate(async () => (await (await fetch('/api/history')).json()).items.map((i) => i.role));
  expect(roles.every((r) => r === USER2)).toBeTruthy();
  expect(roles).not.toContain(USER1);
  await a.close();
  await b.close();
});

test('screenshot: the page answering a demo question', async ({ page }) => {
  const file = process.env.STUDIO_SCREENSHOT || test.info().outputPath('studio.png');
  // The second role: its history holds only this question.
  await login(page, USER2, PASS2);
  await askAndSettle(page, 'What is the average age of singers?');
  await page.screenshot({ path: file, fullPage: true });
  expect(fs.statSync(file).size).toBeGreaterThan(10_000);
});
