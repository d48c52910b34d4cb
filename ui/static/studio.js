// copilot studio's page: every button calls one JSON endpoint of the studio, which calls one copilot.* function as
// the logged-in role. No framework; Chart.js (vendored, served by the studio) draws the charts.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const PAGE = 25;
  const state = { thread: [], historyId: null, result: null, page: 0, chart: null, busy: false };

  // ---- talking to the studio -------------------------------------------------------------------------------
  async function call(method, path, body) {
    const opts = { method, headers: { 'X-CSRF-Token': csrf }, credentials: 'same-origin' };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      throw { sqlstate: '', message: 'the studio did not answer: ' + e.message };
    }
    let data = null;
    try { data = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) {
      if (res.status === 401) { setTimeout(() => location.reload(), 1500); }
      throw (data && data.error) || { sqlstate: '', message: 'HTTP ' + res.status };
    }
    return data;
  }

  function showError(err) {
    $('error').hidden = false;
    $('error-sqlstate').textContent = err.sqlstate ? err.sqlstate : '';
    $('error-sqlstate').hidden = !err.sqlstate;
    $('error-message').textContent = err.message || String(err);
    $('error-detail').textContent = err.detail ? 'DETAIL: ' + err.detail : '';
    $('error-hint').textContent = err.hint ? 'HINT: ' + err.hint : '';
  }
  function clearMessages() {
    $('error').hidden = true;
    $('notice').hidden = true;
  }
  function showNotices(notices) {
    if (notices && notices.length) {
      $('notice').hidden = false;
      $('notice').textContent = notices.join('\n');
    }
  }

  // One request at a time, with the time it has taken and a cancel button (which cancels the backend's query).
  async function busy(label, work) {
    if (state.busy) return;
    state.busy = true;
    document.body.classList.add('busy');
    const started = Date.now();
    $('progress').hidden = false;
    $('progress-text').textContent = label;
    $('elapsed').textContent = '0 s';
    $('cancel').disabled = false;
    const timer = setInterval(() => {
      $('elapsed').textContent = Math.round((Date.now() - started) / 1000) + ' s';
    }, 500);
    try {
      return await work();
    } catch (err) {
      showError(err);
      return undefined;
    } finally {
      clearInterval(timer);
      $('progress').hidden = true;
      state.busy = false;
      document.body.classList.remove('busy');
    }
  }
  $('cancel').addEventListener('click', async () => {
    $('cancel').disabled = true;
    $('progress-text').textContent = 'Cancelling…';
    try { await call('POST', '/api/cancel', {}); } catch (err) { showError(err); }
  });

  // ---- the SQL editor: a textarea over its highlighted copy ----------------------------------------------------
  const KEYWORDS = new Set(('select from where group by order having limit offset join left right inner outer full ' +
    'cross on as and or not in is null like ilike between case when then else end distinct union all intersect ' +
    'except with asc desc count sum avg min max exists true false cast interval date timestamp over partition ' +
    'filter lateral using natural insert update delete into values set create drop alter table').split(' '));
  function escapeHtml(s) {
    return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  }
  function highlight(sql) {
    const re = /(--[^\n]*|\/\*[\s\S]*?(?:\*\/|$))|('(?:[^']|'')*'?)|("(?:[^"]|"")*"?)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_$]*)|([\s\S])/g;
    let out = '';
    let m;
    while ((m = re.exec(sql)) !== null) {
      const t = escapeHtml(m[0]);
      if (m[1]) out += '<span class="tok-comment">' + t + '</span>';
      else if (m[2]) out += '<span class="tok-string">' + t + '</span>';
      else if (m[3]) out += '<span class="tok-ident">' + t + '</span>';
      else if (m[4]) out += '<span class="tok-number">' + t + '</span>';
      else if (m[5] && KEYWORDS.has(m[5].toLowerCase())) out += '<span class="tok-keyword">' + t + '</span>';
      else out += t;
    }
    return out + '\n';
  }
  const editor = $('sql');
  function syncEditor() {
    $('sql-highlight').firstChild.innerHTML = highlight(editor.value);
    $('sql-highlight').scrollTop = editor.scrollTop;
    $('sql-highlight').scrollLeft = editor.scrollLeft;
  }
  editor.addEventListener('input', syncEditor);
  editor.addEventListener('scroll', syncEditor);
  function setSql(sql) {
    editor.value = sql || '';
    syncEditor();
  }

  // ---- ask, follow up, run, explain ---------------------------------------------------------------------------
  function setFeedbackTarget(id) {
    state.historyId = id;
    for (const b of ['thumbs-up', 'thumbs-down', 'correct']) $(b).disabled = id == null;
    $('feedback-status').textContent = '';
  }
  function renderThread() {
    $('thread-box').hidden = state.thread.length === 0;
    $('thread').innerHTML = '';
    for (const t of state.thread) {
      const li = document.createElement('li');
      li.textContent = t.question;
      $('thread').appendChild(li);
    }
    $('question-label').textContent = state.thread.length ? 'Ask a follow-up question' : 'Ask a question about your data';
  }
  $('new-thread').addEventListener('click', () => {
    state.thread = [];
    renderThread();
    $('question').focus();
  });

  // Ask, then explain and run the answer; body[data-flow] is set until all of it is done.
  $('ask-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const question = $('question').value.trim();
    if (!question || state.busy) return;
    document.body.dataset.flow = 'ask';
    try {
      await askFlow(question);
    } finally {
      await refreshHistory();
      delete document.body.dataset.flow;
    }
  });
  // Enter asks (Shift+Enter is a new line); Ctrl/Cmd+Enter in the SQL runs it.
  $('question').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      $('ask-form').requestSubmit();
    }
  });
  editor.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      run();
    }
  });
  async function askFlow(question) {
    clearMessages();
    const last = state.thread.length ? state.thread[state.thread.length - 1].historyId : null;
    const answer = await busy('The model is writing the SQL…', () =>
      call('POST', '/api/ask', { question, follow_up: last }));
    if (!answer) return;
    showNotices(answer.notices);
    setSql(answer.sql);
    setFeedbackTarget(answer.history_id);
    if (answer.history_id != null) {
      state.thread.push({ question, historyId: answer.history_id });
      renderThread();
    }
    $('question').value = '';
    await explain();
    await run();
  }

  async function run() {
    const sql = editor.value.trim();
    if (!sql) return;
    clearMessages();
    const res = await busy('Running the query…', () => call('POST', '/api/run', { sql }));
    if (!res) return;
    showNotices(res.notices);
    state.result = res;
    state.page = 0;
    $('result').hidden = false;
    $('row-count').textContent = res.rows.length + (res.rows.length === 1 ? ' row' : ' rows') +
      (res.capped ? ' (cut at the row limit)' : '');
    renderTable();
    $('chart-kind').value = res.chart.kind;
    renderChart();
  }
  $('run').addEventListener('click', run);

  async function explain() {
    const sql = editor.value.trim();
    if (!sql) return;
    const res = await busy('Explaining…', () => call('POST', '/api/explain', { sql }));
    if (res && res.text) {
      $('explanation').hidden = false;
      $('explanation').textContent = res.text;
    }
  }
  $('explain').addEventListener('click', () => { clearMessages(); explain(); });

  async function sendFeedback(correct, correctedSql) {
    if (state.historyId == null) return;
    clearMessages();
    const res = await busy('Saving feedback…', () => call('POST', '/api/feedback',
      { history_id: state.historyId, correct, corrected_sql: correctedSql || null }));
    if (!res) return;
    showNotices(res.notices);
    $('feedback-status').textContent = res.example_id
      ? 'Thanks: stored as verified example #' + res.example_id + '.'
      : 'Thanks: feedback recorded.';
    refreshHistory();
  }
  $('thumbs-up').addEventListener('click', () => sendFeedback(true));
  $('thumbs-down').addEventListener('click', () => sendFeedback(false));
  $('correct').addEventListener('click', () => sendFeedback(false, editor.value.trim()));

  // ---- the rows ---------------------------------------------------------------------------------------------
  function cellText(v) {
    if (v === null || v === undefined) return '';
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }
  function renderTable() {
    const r = state.result;
    const thead = $('rows').tHead;
    const tbody = $('rows').tBodies[0];
    thead.innerHTML = '';
    tbody.innerHTML = '';
    const hr = thead.insertRow();
    for (const c of r.columns) {
      const th = document.createElement('th');
      th.textContent = c;
      hr.appendChild(th);
    }
    const pages = Math.max(1, Math.ceil(r.rows.length / PAGE));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    for (const row of r.rows.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const tr = tbody.insertRow();
      for (const v of row) {
        const td = tr.insertCell();
        td.textContent = cellText(v);
        if (v === null) td.className = 'null';
        else if (typeof v === 'number') td.className = 'num';
      }
    }
    $('page-info').textContent = 'page ' + (state.page + 1) + ' of ' + pages;
    $('prev-page').disabled = state.page === 0;
    $('next-page').disabled = state.page >= pages - 1;
  }
  $('prev-page').addEventListener('click', () => { state.page--; renderTable(); });
  $('next-page').addEventListener('click', () => { state.page++; renderTable(); });

  // ---- the chart --------------------------------------------------------------------------------------------
  function axes(kind) {
    const r = state.result;
    const numeric = r.columns.map((_, i) => r.rows.some((row) => typeof row[i] === 'number') &&
      r.rows.every((row) => row[i] === null || typeof row[i] === 'number'));
    let { x, y } = r.chart;
    const firstNum = numeric.indexOf(true);
    if (y == null || !numeric[y]) y = firstNum;
    if (x == null || x === y) {
      if (kind === 'scatter') x = numeric.findIndex((n, i) => n && i !== y);
      else x = r.columns.findIndex((_, i) => i !== y);
    }
    return { x, y };
  }
  function renderChart() {
    const kind = $('chart-kind').value;
    const r = state.result;
    if (state.chart) { state.chart.destroy(); state.chart = null; }
    $('big-number').hidden = true;
    $('chart-wrap').hidden = true;
    $('chart-area').dataset.kind = kind;
    if (!r || !r.rows.length || kind === 'none') return;
    const { x, y } = axes(kind);
    if (kind === 'number') {
      const col = y >= 0 ? y : 0;
      $('big-number').hidden = false;
      $('big-number').textContent = cellText(r.rows[0][col]);
      $('big-number').title = r.columns[col];
      return;
    }
    if (y < 0 || x < 0 || x === undefined) {
      $('chart-area').dataset.kind = 'none';
      showNotices(['No ' + kind + ' chart for this result: it needs ' +
        (kind === 'scatter' ? 'two number columns.' : 'a number column and another column.')]);
      return;
    }
    $('chart-wrap').hidden = false;
    let rows = r.rows.filter((row) => row[y] !== null);
    if (kind === 'line') rows = rows.slice().sort((a, b) => String(a[x]).localeCompare(String(b[x]), undefined, { numeric: true }));
    const color = '#2f6fde';
    const data = kind === 'scatter'
      ? { datasets: [{ label: r.columns[y] + ' by ' + r.columns[x], data: rows.map((row) => ({ x: row[x], y: row[y] })), backgroundColor: color }] }
      : { labels: rows.map((row) => cellText(row[x])), datasets: [{ label: r.columns[y], data: rows.map((row) => row[y]), backgroundColor: color, borderColor: color }] };
    state.chart = new window.Chart($('chart'), {
      type: kind,
      data,
      options: {
        animation: false,
        responsive: false,
        plugins: { legend: { display: true } },
        scales: {
          x: { type: kind === 'scatter' ? 'linear' : 'category', title: { display: true, text: r.columns[x] } },
          y: { beginAtZero: kind === 'bar', title: { display: true, text: r.columns[y] } },
        },
      },
    });
  }
  $('chart-kind').addEventListener('change', renderChart);

  // ---- history and status -----------------------------------------------------------------------------------
  async function refreshHistory() {
    let res;
    const list = $('history');
    try { res = await call('GET', '/api/history'); } catch (err) {
      list.innerHTML = '';
      const li = document.createElement('li');
      li.className = 'history-error';
      li.textContent = 'History unavailable: ' + (err.sqlstate ? err.sqlstate + ' ' : '') + err.message;
      list.appendChild(li);
      return;
    }
    list.innerHTML = '';
    for (const item of res.items) {
      const li = document.createElement('li');
      li.className = 'history-item' + (item.outcome === '00000' ? '' : ' failed');
      li.dataset.id = item.id;
      const q = document.createElement('div');
      q.className = 'q';
      q.textContent = item.question;
      const meta = document.createElement('div');
      meta.className = 'muted';
      meta.textContent = item.at + ' · ' + item.kind + (item.role !== res.role ? ' · ' + item.role : '') +
        (item.outcome === '00000' ? '' : ' · ' + item.outcome) +
        (item.feedback === true ? ' · ✓ right' : item.feedback === false ? ' · ✗ wrong' : '');
      li.append(q, meta);
      li.addEventListener('click', () => {
        if (item.sql) setSql(item.sql);
        setFeedbackTarget(item.role === res.role ? item.id : null);
        $('question').value = item.question;
      });
      list.appendChild(li);
    }
  }
  $('refresh-history').addEventListener('click', refreshHistory);

  async function refreshStatus() {
    try {
      const s = await call('GET', '/api/status');
      $('model-status').textContent = 'model: ' + (s.model || '?').split('/').pop() + ' (' + s.state + ')';
    } catch (err) { $('model-status').textContent = ''; }
  }

  syncEditor();
  refreshStatus().then(refreshHistory);
})();
