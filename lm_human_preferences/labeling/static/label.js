// The labeler page: shows the current comparison from /api/next and sends answers, skips and undos.
// Model text is untrusted: it only ever enters the page through textContent (never innerHTML).
// One request at a time: keys and taps are ignored while one is in flight, so a double press cannot answer the
// next comparison by accident. The server commits an answer before it sends the next comparison.
(function () {
  'use strict';

  var body = document.body;
  var numResponses = parseInt(body.getAttribute('data-num-responses'), 10) || 9;
  var current = null;  // the assignment on screen: {id, uid, query, responses}
  var busy = false;

  function $(id) { return document.getElementById(id); }

  function setStatus(text, kind) {
    var el = $('status');
    el.textContent = text || '';
    el.className = 'status' + (kind ? ' ' + kind : '');
  }

  function showProgress(p) {
    if (!p) { return; }
    var bar = $('progress-bar');
    bar.max = Math.max(p.needed, 1);
    bar.value = p.answered;
    var parts = [p.answered + ' / ' + p.needed + ' done', 'you: ' + p.mine];
    if (p.per_hour !== null && p.per_hour !== undefined) {
      parts.push(Math.round(p.per_hour) + ' per hour');
    }
    $('progress-text').textContent = parts.join(' · ');
  }

  function responseCard(text, position) {
    var card = document.createElement('article');
    card.className = 'response';
    card.setAttribute('data-position', String(position));
    var head = document.createElement('div');
    head.className = 'response-head';
    var key = document.createElement('span');
    key.className = 'key';
    key.textContent = String(position + 1);
    head.appendChild(key);
    var pre = document.createElement('div');
    pre.className = 'text';
    pre.textContent = text;  // untrusted: text only
    var button = document.createElement('button');
    button.type = 'button';
    button.className = 'choose';
    button.textContent = 'Best: ' + (position + 1);
    button.addEventListener('click', function () { choose(position); });
    card.appendChild(head);
    card.appendChild(pre);
    card.appendChild(button);
    return card;
  }

  function show(assignment) {
    current = assignment;
    if (document.activeElement && document.activeElement !== body) {
      document.activeElement.blur();  // a focused button must not take the next Enter/Space for a new item
    }
    if (!assignment) {
      $('comparison').hidden = true;
      $('done').hidden = false;
      body.setAttribute('data-assignment', '');
      return;
    }
    $('done').hidden = true;
    $('comparison').hidden = false;
    $('query').textContent = assignment.query;  // untrusted: text only
    var list = $('responses');
    while (list.firstChild) { list.removeChild(list.firstChild); }
    for (var i = 0; i < assignment.responses.length; i++) {
      list.appendChild(responseCard(assignment.responses[i], i));
    }
    body.setAttribute('data-assignment', String(assignment.id));
    window.scrollTo(0, 0);
  }

  function request(method, path, payload) {
    var options = {method: method, credentials: 'same-origin', cache: 'no-store',
                   headers: {'Accept': 'application/json'}};
    if (payload !== undefined) {
      options.headers['Content-Type'] = 'application/json';
      options.body = JSON.stringify(payload);
    }
    return fetch(path, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        return {status: response.status, data: data};
      });
    });
  }

  // Sends one request and shows the assignment and progress it returns; `message` says what happened. A 409/404
  // (the lease expired and went to someone else, or the item is no longer this labeler's) shows what is current.
  function act(method, path, payload, message) {
    if (busy) { return; }
    busy = true;
    body.setAttribute('data-state', 'busy');
    request(method, path, payload).then(function (r) {
      if (r.status !== 409 && r.status !== 404) { return {r: r, note: null}; }
      var why = (r.data && r.data.error) || String(r.status);
      return request('GET', '/api/next').then(function (again) {
        return {r: again, note: 'That comparison was no longer yours (' + why + '); here is the current one.'};
      });
    }).then(function (out) {
      var r = out.r;
      if (r.status === 200) {
        show(r.data.assignment);
        showProgress(r.data.progress);
        if (out.note) {
          setStatus(out.note, 'warn');
        } else {
          setStatus(typeof message === 'function' ? message(r.data) : message, '');
        }
      } else if (r.status === 401 || r.status === 403) {
        setStatus(((r.data && r.data.error) || 'not allowed') + ': open your labeling link again.', 'error');
      } else {
        setStatus('Error ' + r.status + ': ' + ((r.data && r.data.error) || 'try again'), 'error');
      }
    }).catch(function (e) {
      setStatus('Network error (' + e + '): try again.', 'error');
    }).then(function () {
      busy = false;
      body.setAttribute('data-state', current ? 'ready' : 'done');
    });
  }

  function choose(position) {
    if (!current || position >= current.responses.length) { return; }
    act('POST', '/api/answer', {assignment_id: current.id, position: position},
        'Saved: response ' + (position + 1) + '.');
  }

  function skip() {
    if (!current) { return; }
    act('POST', '/api/skip', {assignment_id: current.id}, 'Skipped.');
  }

  function undo() {
    act('POST', '/api/undo', {}, function (data) {
      return data.undone ? 'Undone: choose again.' : 'Nothing to undo.';
    });
  }

  document.addEventListener('keydown', function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) { return; }
    var key = e.key;
    if (/^[1-9]$/.test(key) && parseInt(key, 10) <= numResponses) {
      e.preventDefault();
      choose(parseInt(key, 10) - 1);
    } else if (key === 's' || key === 'S' || key === '0') {
      e.preventDefault();
      skip();
    } else if (key === 'u' || key === 'U' || key === 'Backspace') {
      e.preventDefault();
      undo();
    }
  });
  $('skip').addEventListener('click', skip);
  $('undo').addEventListener('click', undo);
  $('undo-done').addEventListener('click', undo);
  $('again').addEventListener('click', function () { act('GET', '/api/next', undefined, ''); });

  act('GET', '/api/next', undefined, '');
}());
