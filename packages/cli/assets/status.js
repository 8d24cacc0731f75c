// The blkfilter status page: plain browser JavaScript, no build step. It reads the daemon's
// read-only API (/api/status, /api/heatmap, /api/backups) and its Server-Sent Events
// (/api/live); it never sends anything that changes state.
/* global uPlot, document, Node, performance, fetch, CSS, EventSource, setInterval */
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k.startsWith('data-')) e.setAttribute(k, String(v));
      else e[k] = v;
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  const bytes = (n) => {
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n >= 100 || i === 0 || Number.isInteger(n) ? Math.round(n) : n.toFixed(1)} ${u[i]}`;
  };
  const time = (ms) => new Date(ms).toLocaleTimeString();

  // --- devices --------------------------------------------------------------------------------
  function renderDevices(status) {
    $('nbd').textContent = status.nbd.kind === 'tcp' ? `nbd://${status.nbd.host}:${status.nbd.port}/` : status.nbd.kind === 'unix' ? `nbd+unix:///?socket=${status.nbd.path}` : `fd ${status.nbd.fd}`;
    const t = el('table', {}, el('tr', {}, el('th', {}, 'device'), el('th', {}, 'size'), el('th', {}, 'backend'), el('th', {}, 'filters (bios meet them left to right)'), el('th', {}, 'partitions')));
    for (const d of status.devices) {
      const filters = [...d.filters].sort((a, b) => b.altitude - a.altitude).map((f) => el('span', { class: 'filter', title: `altitude ${f.altitude}` }, `${f.name} @${f.altitude}`));
      const parts = d.partitions.map((p) => `${p.name} (sector ${p.start}, ${bytes(p.sectors * 512)})`).join(', ') || '—';
      t.append(el('tr', { 'data-device': d.name }, el('td', {}, d.name), el('td', {}, bytes(d.sizeBytes)), el('td', {}, d.backend), el('td', {}, ...(filters.length ? filters : ['none'])), el('td', {}, parts)));
    }
    $('devices').replaceChildren(t);
  }

  // --- CBT heat maps --------------------------------------------------------------------------
  const W = 1024;
  const H = 256;
  const heat = new Map(); // device -> { canvas, info, offset, length, wrap }

  // Colour of a generation: unchanged is light grey; the last take is red; older takes fade
  // from orange towards blue, so "what changed recently" stands out.
  function colour(gen, snap) {
    if (gen === 0) return [230, 233, 238];
    const age = snap - gen; // 0 = changed in the last take
    if (age <= 0) return [220, 40, 30];
    const t = Math.min(age / Math.max(snap - 1, 1), 1);
    return [Math.round(240 - 180 * t), Math.round(150 - 20 * t), Math.round(40 + 180 * t)];
  }

  // Cell size: the largest of 16..1 pixels that still fits every block; past W*H blocks, one
  // pixel per bucket of several blocks (the server takes the max over each bucket).
  function layout(length) {
    for (const s of [16, 8, 4, 2]) if ((W / s) * (H / s) >= length) return { cell: s, cols: W / s, buckets: length };
    return { cell: 1, cols: W, buckets: Math.min(length, W * H) };
  }

  async function drawHeat(h) {
    const t0 = performance.now();
    const { cell, cols, buckets } = layout(h.length);
    const url = `/api/heatmap?device=${encodeURIComponent(h.device)}&offset=${h.offset}&length=${h.length}&buckets=${buckets}`;
    const res = await fetch(url);
    if (!res.ok) {
      h.label.textContent = (await res.json()).error;
      return;
    }
    const per = Number(res.headers.get('X-Blocks-Per-Bucket'));
    const snap = Number(res.headers.get('X-Snap-Number'));
    const blockSize = Number(res.headers.get('X-Block-Size'));
    const blockCount = Number(res.headers.get('X-Block-Count'));
    const data = new Uint8Array(await res.arrayBuffer());
    const ctx = h.canvas.getContext('2d');
    const img = ctx.createImageData(W, H);
    const px = new Uint32Array(img.data.buffer);
    // Little-endian RGBA packed into one word per pixel.
    const pack = (c) => (255 << 24) | (c[2] << 16) | (c[1] << 8) | c[0];
    const lut = new Uint32Array(256);
    for (let g = 0; g < 256; g++) lut[g] = pack(colour(g, snap));
    px.fill(pack([255, 255, 255]));
    if (cell === 1) {
      for (let i = 0; i < data.length; i++) px[i] = lut[data[i]];
    } else {
      for (let i = 0; i < data.length; i++) {
        const c = lut[data[i]];
        const x0 = (i % cols) * cell;
        const y0 = Math.floor(i / cols) * cell;
        // One pixel of gap between cells (cell > 2) keeps single blocks apart.
        const inner = cell > 2 ? cell - 1 : cell;
        for (let y = y0; y < y0 + inner; y++) px.fill(c, y * W + x0, y * W + x0 + inner);
      }
    }
    ctx.putImageData(img, 0, 0);
    const ms = performance.now() - t0;
    Object.assign(h.canvas.dataset, { cols, cell, per, offset: h.offset, length: h.length, snap, blockSize, renderMs: ms.toFixed(1) });
    h.blockCount = blockCount;
    h.blockSize = blockSize;
    const changed = data.reduce((n, g) => n + (g === snap ? 1 : 0), 0);
    h.label.textContent = `blocks ${h.offset}–${h.offset + h.length - 1} of ${blockCount} (block ${bytes(blockSize)}; a cell is ${per} block${per > 1 ? 's' : ''}, ${bytes(per * blockSize)}); ${changed} cell${changed === 1 ? '' : 's'} changed in take ${snap}; drawn in ${ms.toFixed(0)} ms`;
  }

  function ensureHeat(device) {
    let h = heat.get(device);
    if (h !== undefined) return h;
    const canvas = el('canvas', { width: W, height: H, 'data-device': device, title: 'click to zoom in' });
    const label = el('span', { class: 'muted' }, 'loading…');
    const whole = el('button', { type: 'button' }, 'whole disk');
    const out = el('button', { type: 'button' }, 'zoom out');
    const legend = el('span', { class: 'legend' }, el('span', { style: 'background:#e6e9ee' }), 'unchanged', el('span', { style: 'background:#f0962a' }), 'older take', el('span', { style: 'background:#dc281e' }), 'last take');
    const wrap = el('div', { class: 'hm' }, el('div', { class: 'bar' }, el('strong', {}, device), whole, out, legend), canvas, label);
    h = { device, canvas, label, offset: 0, length: 0, blockCount: 0, blockSize: 0, wrap };
    heat.set(device, h);
    const hh = h;
    canvas.addEventListener('click', (ev) => {
      const d = canvas.dataset;
      const r = canvas.getBoundingClientRect();
      const x = Math.floor(((ev.clientX - r.left) * W) / r.width / Number(d.cell));
      const y = Math.floor(((ev.clientY - r.top) * H) / r.height / Number(d.cell));
      const block = hh.offset + (y * Number(d.cols) + x) * Number(d.per);
      const len = Math.max(1, Math.ceil(hh.length / 8));
      hh.offset = Math.max(0, Math.min(block - Math.floor(len / 2), hh.blockCount - len));
      hh.length = len;
      void drawHeat(hh);
    });
    whole.addEventListener('click', () => { hh.offset = 0; hh.length = hh.blockCount; void drawHeat(hh); });
    out.addEventListener('click', () => {
      const len = Math.min(hh.blockCount, hh.length * 8);
      hh.offset = Math.max(0, Math.min(hh.offset - Math.floor((len - hh.length) / 2), hh.blockCount - len));
      hh.length = len;
      void drawHeat(hh);
    });
    $('heatmaps').append(wrap);
    return h;
  }

  async function refreshHeat(status) {
    for (const d of status.devices) {
      if (!d.filters.some((f) => f.name === 'cbt')) continue;
      const h = ensureHeat(d.name);
      if (h.length === 0) {
        const res = await fetch(`/api/cbt?device=${encodeURIComponent(d.name)}`);
        if (!res.ok) continue;
        const info = await res.json();
        h.blockCount = info.blockCount;
        h.length = info.blockCount;
      }
      await drawHeat(h);
    }
    if (heat.size === 0) $('heatmaps').replaceChildren(el('p', { class: 'muted' }, 'no device has CBT attached (serve --cbt)'));
  }

  // --- snapshots ------------------------------------------------------------------------------
  function renderSnapshots(status) {
    if (status.snapshots.length === 0) {
      $('snapshots').replaceChildren(el('p', { class: 'muted' }, 'none'));
      return;
    }
    const rows = status.snapshots.map((s) => {
      const st = s.storage;
      const pct = st.limitBytes > 0 ? (100 * st.usedBytes) / st.limitBytes : 0;
      const fill = el('div', { class: `fill${pct > 80 ? ' warn' : ''}` }, el('div', { style: `width:${Math.min(pct, 100)}%` }));
      const chunks = s.devices.map((d) => `${d.device}: ${d.copiedChunks} of ${d.chunks} chunks copied`).join('; ');
      const events = (s.history || []).map((e) => el('li', { class: e.type }, `${time(e.time)} ${e.type}${e.type === 'corrupted' ? `: ${e.error ? e.error.message : ''}` : e.usedBytes !== undefined ? ` (used ${bytes(e.usedBytes)} of ${bytes(e.allocatedBytes)} allocated)` : ''}`));
      const timeline = el('ul', { class: 'timeline' }, el('li', {}, `${time(s.createdAt)} created`), ...(s.takenAt ? [el('li', {}, `${time(s.takenAt)} taken`)] : []), ...events);
      return el(
        'tr',
        { 'data-snapshot': s.id, 'data-used': st.usedBytes, 'data-limit': st.limitBytes },
        el('td', {}, s.id),
        el('td', { class: `state-${s.state}` }, s.state),
        el('td', {}, fill, ` ${bytes(st.usedBytes)} of ${bytes(st.limitBytes)} (${pct.toFixed(1)}%)`, el('div', { class: 'muted' }, `${st.kind}, ${bytes(st.allocatedBytes)} allocated`)),
        el('td', {}, chunks, el('div', { class: 'muted' }, s.images.join(', '))),
        el('td', {}, timeline),
      );
    });
    $('snapshots').replaceChildren(el('table', {}, el('tr', {}, el('th', {}, 'snapshot'), el('th', {}, 'state'), el('th', {}, 'diff storage'), el('th', {}, 'chunks'), el('th', {}, 'events')), ...rows));
  }

  // --- backups --------------------------------------------------------------------------------
  const lastDone = new Map();
  let folders = [];
  function renderBackups(status, now) {
    const running = (status.backups || []).map((b) => {
      const prev = lastDone.get(b.id);
      const rate = prev ? ((b.bytesDone - prev.done) * 1000) / Math.max(now - prev.t, 1) : 0;
      lastDone.set(b.id, { done: b.bytesDone, t: now });
      const pct = b.bytesTotal > 0 ? (100 * b.bytesDone) / b.bytesTotal : 0;
      return el('tr', { 'data-backup': b.id }, el('td', {}, String(b.id)), el('td', {}, b.dir), el('td', {}, el('div', { class: 'fill' }, el('div', { style: `width:${pct}%` })), ` ${bytes(b.bytesDone)} of ${bytes(b.bytesTotal)}`), el('td', {}, `${bytes(rate)}/s`));
    });
    const parts = [];
    if (running.length) parts.push(el('h3', {}, 'in progress'), el('table', {}, el('tr', {}, el('th', {}, 'id'), el('th', {}, 'folder'), el('th', {}, 'done'), el('th', {}, 'rate')), ...running));
    for (const f of folders) {
      const rows = f.points.flatMap((p) => p.images.map((i) => el('tr', {}, el('td', {}, String(p.position)), el('td', {}, new Date(p.createdAt).toLocaleString()), el('td', {}, i.device), el('td', {}, i.kind), el('td', {}, bytes(i.size)))));
      parts.push(el('h3', {}, f.dir), f.error ? el('p', { class: 'state-corrupted' }, f.error) : el('table', {}, el('tr', {}, el('th', {}, 'point'), el('th', {}, 'created'), el('th', {}, 'device'), el('th', {}, 'kind'), el('th', {}, 'size')), ...rows));
    }
    $('backups').replaceChildren(...(parts.length ? parts : [el('p', { class: 'muted' }, 'none')]));
  }
  async function refreshFolders() {
    const res = await fetch('/api/backups');
    if (res.ok) folders = await res.json();
  }

  // --- live charts ----------------------------------------------------------------------------
  const KEEP = 60;
  const charts = new Map(); // key -> { data: [t, ...series] per chart, plots }
  function chartFor(key) {
    let c = charts.get(key);
    if (c !== undefined) return c;
    const row = el('div', { class: 'chartrow', 'data-key': key }, el('h3', {}, key.replace(':', ' ')));
    $('charts').append(row);
    const mk = (title, labels, colours) => {
      const data = [[], ...labels.map(() => [])];
      // The last KEEP seconds, whatever the number of samples so far (one sample has no range).
      const key = labels.map((l, i) => `<span style="color:${colours[i]}">&#9632; ${l}</span>`).join(' ');
      const plot = new uPlot(
        {
          title,
          width: 300,
          height: 130,
          legend: { show: false },
          scales: { x: { time: true, range: (_u, _min, max) => [max - KEEP, max] }, y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
          series: [{}, ...labels.map((l, i) => ({ label: l, stroke: colours[i], width: 1.5, spanGaps: true, points: { size: 4 } }))],
          axes: [{ size: 28 }, { size: 50 }],
        },
        data,
        row,
      );
      plot.root.append(el('div', { class: 'muted', innerHTML: key }));
      return { data, plot };
    };
    c = [mk('IOPS', ['read', 'write'], ['#3d7bd9', '#dc281e']), mk('throughput MiB/s', ['read', 'write'], ['#3d7bd9', '#dc281e']), mk('latency ms', ['p50', 'p99'], ['#2a7d3c', '#d9822b'])];
    charts.set(key, c);
    return c;
  }
  function pushSample(t, io) {
    for (const [key, s] of Object.entries(io)) {
      const [iops, tput, lat] = chartFor(key);
      const add = (c, vals) => {
        c.data[0].push(t / 1000);
        vals.forEach((v, i) => c.data[i + 1].push(v));
        if (c.data[0].length > KEEP) for (const a of c.data) a.shift();
        c.plot.setData(c.data);
      };
      add(iops, [s.readIops, s.writeIops]);
      add(tput, [s.readBytesPerSec / 1048576, s.writeBytesPerSec / 1048576]);
      add(lat, [s.p50Ms, s.p99Ms]);
      const row = document.querySelector(`.chartrow[data-key="${CSS.escape(key)}"]`);
      if (row) row.dataset.samples = String(iops.data[0].length);
    }
  }

  // --- wiring ---------------------------------------------------------------------------------
  function renderStatus(status, now) {
    renderDevices(status);
    renderSnapshots(status);
    renderBackups(status, now);
  }
  async function start() {
    const status = await (await fetch('/api/status')).json();
    await refreshFolders();
    renderStatus(status, Date.now());
    await refreshHeat(status);
    document.body.dataset.ready = 'true';
    const es = new EventSource('/api/live');
    es.onopen = () => { $('conn').textContent = 'live'; };
    es.onerror = () => { $('conn').textContent = 'reconnecting…'; };
    es.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      renderStatus(m.status, m.t);
      pushSample(m.t, m.io);
    };
    setInterval(() => void refreshFolders(), 5000);
  }
  start().catch((err) => { $('conn').textContent = `error: ${err.message}`; });
})();
