"""The labeling app's HTTP API and pages on a real loopback server (uvicorn on 127.0.0.1, a free port): tokens,
assignment without duplicates under concurrent labelers, leases, answer/skip/undo, escaping, size limits, bad ids,
and no path from a request to the filesystem."""
import importlib.util
import json
import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")
pytest.importorskip("uvicorn", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")

from lm_human_preferences.labeling import app as label_app  # noqa: E402
from lm_human_preferences.labeling.store import StoreError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lmhp_test_labeling_server", REPO / "tests/fixtures/labeling_server.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


@pytest.fixture
def served(tmp_path):
    """A store of 6 comparisons (index 5 for two labelers), labelers alice and bob, an admin token, served."""
    store = fx.make_store(tmp_path / "store.db", 6, double=(5,))
    tokens = {name: store.add_labeler(name) for name in ("alice", "bob")}
    tokens["admin"] = store.add_admin_token()
    with fx.ThreadServer(label_app.make_app(store)) as server:
        yield server, store, tokens


def next_of(server, token):
    status, _, _, data = fx.call(server.url, "GET", "/api/next", token=token)
    assert status == 200, data
    return data


def answer(server, token, assignment_id, position):
    return fx.call(server.url, "POST", "/api/answer", token=token,
                   body={"assignment_id": assignment_id, "position": position})


def test_every_route_but_static_needs_a_token(served):
    server, store, tokens = served
    for path in ("/label", "/label?token=wrong", "/admin", "/admin?token=wrong", "/api/next", "/api/admin/stats"):
        status, _, body, _ = fx.call(server.url, "GET", path)
        assert status == 401, (path, status)
        assert b"alice" not in body and b"Query" not in body
    for path in ("/api/answer", "/api/skip", "/api/undo"):
        assert fx.call(server.url, "POST", path, body={"assignment_id": 1, "position": 0})[0] == 401
        assert fx.call(server.url, "POST", path, token="not-a-token", body={})[0] == 401
    # the wrong kind of token: a labeler is not an admin, the admin is not a labeler
    assert fx.call(server.url, "GET", "/api/admin/stats", token=tokens["alice"])[0] == 403
    assert fx.call(server.url, "GET", "/admin", headers={"Cookie": f"lmhp_labeler={tokens['alice']}"})[0] == 403
    assert fx.call(server.url, "GET", "/api/next", token=tokens["admin"])[0] == 403
    assert fx.call(server.url, "GET", "/label", headers={"Cookie": f"lmhp_admin={tokens['admin']}"})[0] == 401
    # static files need none
    status, headers, body, _ = fx.call(server.url, "GET", "/static/label.js")
    assert status == 200 and b"textContent" in body and "javascript" in headers["content-type"]
    assert fx.call(server.url, "GET", "/static/style.css")[0] == 200
    assert store.answers() == [] and store.progress()["answered"] == 0


def test_the_link_sets_a_cookie_and_the_page_escapes_what_it_renders(served):
    server, store, tokens = served
    status, headers, _, _ = fx.call(server.url, "GET", f"/label?token={tokens['alice']}")
    assert status == 303 and headers["location"] == "/label"  # the token leaves the address bar
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"lmhp_labeler={tokens['alice']};")
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    status, headers, body, _ = fx.call(server.url, "GET", "/label", headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"] and headers["cache-control"] == "no-store"
    page = body.decode()
    # the store's instructions are rendered, escaped
    assert "Which continuation is &lt;b&gt;most positive&lt;/b&gt;?" in page
    assert "&lt;script&gt;alert(&#39;instructions&#39;)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<b>most" not in page
    assert 'data-num-responses="4"' in page and "alice" in page
    assert page.count("<script") == 1 and '<script src="/static/label.js" defer></script>' in page
    # the admin link works the same way
    status, headers, _, _ = fx.call(server.url, "GET", f"/admin?token={tokens['admin']}")
    assert status == 303 and headers["location"] == "/admin"
    status, _, body, _ = fx.call(server.url, "GET", "/admin", headers={"Cookie": headers["set-cookie"].split(";")[0]})
    assert status == 200 and b"alice" in body and b"bob" in body


def test_model_text_reaches_the_page_only_as_json_strings_exactly(tmp_path):
    store = fx.make_store(tmp_path / "store.db", 2, n=6, texts=lambda i: fx.NASTY_TEXTS)
    token = store.add_labeler("alice")
    with fx.ThreadServer(label_app.make_app(store)) as server:
        status, headers, raw, data = fx.call(server.url, "GET", "/api/next", token=token)
        assert status == 200 and headers["content-type"] == "application/json"
        a = data["assignment"]
        assert sorted(a["responses"]) == sorted(fx.NASTY_TEXTS)  # exact: whitespace, newlines, unicode kept
        assert a["query"] == fx.comparison(0)["query_text"]
        assert headers["x-content-type-options"] == "nosniff"  # never sniffed as HTML
    # the page's script puts them in with textContent only: it never uses innerHTML or similar sinks
    script = re.sub(r"//[^\n]*", "", (Path(label_app.STATIC_DIR) / "label.js").read_text())  # code, not comments
    assert script.count("textContent =") >= 4
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script


def test_answers_map_display_positions_back_to_samples_and_come_with_the_next_item(served):
    server, store, tokens = served
    first = next_of(server, tokens["alice"])
    a = first["assignment"]
    assert first["progress"] == {"needed": 7, "answered": 0, "comparisons": 6, "mine": 0, "per_hour": None}
    assert next_of(server, tokens["alice"])["assignment"]["id"] == a["id"]  # the same lease until answered
    status, _, _, data = answer(server, tokens["alice"], a["id"], 2)
    assert status == 200
    chosen_text = a["responses"][2]
    sample = int(chosen_text.rsplit(".", 1)[1])  # the made-up texts end in #<comparison>.<sample>
    assert data["recorded"] == {"assignment_id": a["id"], "position": 2, "sample": sample}
    # committed before the response: the store (another connection) has it
    assert [(x["uid"], x["name"], x["choice_position"], x["choice_sample"]) for x in store.answers()] == \
        [(a["uid"], "alice", 2, sample)]
    assert data["assignment"]["uid"] != a["uid"] and data["progress"]["mine"] == 1
    assert data["progress"]["answered"] == 1
    # orders are drawn per assignment: over the remaining items, not every order is the identity
    orders = []
    current = data["assignment"]
    while current is not None:
        orders.append([int(t.rsplit(".", 1)[1]) for t in current["responses"]])
        status, _, _, data = answer(server, tokens["alice"], current["id"], 0)
        assert status == 200
        current = data["assignment"]
    assert len(orders) == 5 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert any(o != [0, 1, 2, 3] for o in orders)  # (1/24)^5 to fail by chance
    assert data["progress"]["mine"] == 6 and data["progress"]["per_hour"] is not None


def test_concurrent_labelers_never_get_the_same_comparison(tmp_path):
    count, labelers = 40, 8
    double = tuple(range(0, count, 5))
    store = fx.make_store(tmp_path / "store.db", count, double=double)
    tokens = [store.add_labeler(f"l{k}") for k in range(labelers)]
    seen = {k: [] for k in range(labelers)}
    errors = []

    def work(k):
        try:
            data = next_of(server, tokens[k])
            while data["assignment"] is not None:
                a = data["assignment"]
                seen[k].append(a["uid"])
                status, _, _, data = answer(server, tokens[k], a["id"], len(seen[k]) % 4)
                assert status == 200, data
        except Exception as e:  # reported below
            errors.append(e)

    with fx.ThreadServer(label_app.make_app(store)) as server:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(labelers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    every = [uid for k in seen for uid in seen[k]]
    expected = {f"1-{i}": (2 if i in double else 1) for i in range(count)}
    assert {uid: every.count(uid) for uid in set(every)} == expected  # no comparison twice beyond its copies
    for k in seen:
        assert len(seen[k]) == len(set(seen[k]))  # a doubled comparison goes to two different labelers
    assert sum(len(v) for v in seen.values()) > 0 and sum(1 for v in seen.values() if v) >= 2
    answers = store.answers()
    assert len(answers) == len(every) == sum(expected.values())
    assert sorted((a["name"], a["uid"]) for a in answers) == sorted((f"l{k}", uid) for k in seen for uid in seen[k])


def test_an_abandoned_lease_expires_and_goes_to_another_labeler(tmp_path):
    store = fx.make_store(tmp_path / "store.db", 1)
    alice, bob = store.add_labeler("alice"), store.add_labeler("bob")
    with fx.ThreadServer(label_app.make_app(store, lease_seconds=0.5)) as server:
        a = next_of(server, alice)["assignment"]
        assert next_of(server, bob)["assignment"] is None  # alice holds the only comparison
        time.sleep(0.7)
        b = next_of(server, bob)["assignment"]
        assert b is not None and b["uid"] == a["uid"] and b["id"] != a["id"]
        status, _, _, data = answer(server, alice, a["id"], 0)  # alice comes back too late
        assert status == 409 and "expired" in data["error"]
        assert answer(server, bob, b["id"], 1)[0] == 200
        assert next_of(server, alice)["assignment"] is None
    assert [(x["name"], x["choice_position"]) for x in store.answers()] == [("bob", 1)]


def test_skip_and_undo(served):
    server, store, tokens = served
    alice = tokens["alice"]
    first = next_of(server, alice)["assignment"]
    status, _, _, data = fx.call(server.url, "POST", "/api/skip", token=alice, body={"assignment_id": first["id"]})
    assert status == 200 and data["skipped"] == {"assignment_id": first["id"]}
    second = data["assignment"]
    assert second["uid"] != first["uid"]
    third = answer(server, alice, second["id"], 1)[3]["assignment"]
    fourth = answer(server, alice, third["id"], 3)[3]["assignment"]
    assert [x["uid"] for x in store.answers()] == [second["uid"], third["uid"]]
    # undo takes back the last answer: the same assignment, the same order, open again
    status, _, _, data = fx.call(server.url, "POST", "/api/undo", token=alice, body={})
    assert status == 200 and data["undone"] is True
    assert data["assignment"] == {**third, "expires_at": data["assignment"]["expires_at"]}
    assert [x["uid"] for x in store.answers()] == [second["uid"]] and data["progress"]["mine"] == 1
    assert answer(server, alice, fourth["id"], 0)[0] == 409  # the lease on the next item was released
    assert answer(server, alice, third["id"], 2)[0] == 200
    assert [(x["uid"], x["choice_position"]) for x in store.answers()] == [(second["uid"], 1), (third["uid"], 2)]
    # undo three times more: the new answer to `third`, the answer to `second`, then the skip of `first`
    for expected in (third, second, first):
        status, _, _, data = fx.call(server.url, "POST", "/api/undo", token=alice, body={})
        assert data["undone"] is True and data["assignment"]["id"] == expected["id"]
    assert store.answers() == []
    status, _, _, data = fx.call(server.url, "POST", "/api/undo", token=alice, body={})
    assert status == 200 and data["undone"] is False and data["assignment"]["id"] == first["id"]
    # bob never sees what alice skipped as taken: the skipped comparison is free for him
    bob_seen = set()
    data = next_of(server, tokens["bob"])
    while data["assignment"] is not None and len(bob_seen) < 7:
        bob_seen.add(data["assignment"]["uid"])
        data = fx.call(server.url, "POST", "/api/skip", token=tokens["bob"],
                       body={"assignment_id": data["assignment"]["id"]})[3]
    assert first["uid"] not in bob_seen  # alice holds it again after her undo
    assert len(bob_seen) == 5


def test_request_bodies_are_size_limited_and_typed(served):
    server, store, tokens = served
    alice = tokens["alice"]
    a = next_of(server, alice)["assignment"]
    big = json.dumps({"assignment_id": a["id"], "position": 0, "pad": "x" * label_app.MAX_BODY_BYTES}).encode()
    status, _, _, data = fx.call(server.url, "POST", "/api/answer", token=alice, raw_body=big,
                                 headers={"Content-Type": "application/json"})
    assert status == 413 and "4096" in data["error"]
    # a chunked body announces no length: it is counted as it arrives
    chunks = iter([big[:3000], big[3000:]])  # http.client sends an iterable chunked, without Content-Length
    status, _, _, data = fx.call(server.url, "POST", "/api/answer", token=alice, raw_body=chunks,
                                 headers={"Content-Type": "application/json"})
    assert status == 413
    status, _, _, data = fx.call(server.url, "POST", "/api/answer", token=alice,
                                 raw_body=json.dumps({"assignment_id": a["id"], "position": 0}).encode(),
                                 headers={"Content-Type": "text/plain"})
    assert status == 415  # a cross-site form cannot send application/json without a preflight
    assert store.answers() == []


BAD_ANSWERS = [  # (body, status); OWN and BOBS stand for alice's and bob's current assignment ids
    ({"assignment_id": "1", "position": 0}, 400),
    ({"assignment_id": 1.0, "position": 0}, 400),
    ({"assignment_id": True, "position": 0}, 400),
    ({"assignment_id": None, "position": 0}, 400),
    ({"position": 0}, 400),
    ({"assignment_id": 0, "position": 0}, 400),
    ({"assignment_id": -3, "position": 0}, 400),
    ({"assignment_id": 2 ** 70, "position": 0}, 400),
    ({"assignment_id": "OWN", "position": 4}, 400),
    ({"assignment_id": "OWN", "position": -1}, 400),
    ({"assignment_id": "OWN", "position": "1"}, 400),
    ({"assignment_id": "OWN", "position": None}, 400),
    ({"assignment_id": "OWN", "position": 0, "extra": 1}, 400),
    ({"assignment_id": 999999, "position": 0}, 404),
    ({"assignment_id": "BOBS", "position": 0}, 404),
]


def test_bad_ids_are_refused(served):
    server, store, tokens = served
    ids = {"OWN": next_of(server, tokens["alice"])["assignment"]["id"],
           "BOBS": next_of(server, tokens["bob"])["assignment"]["id"]}
    for body, status in BAD_ANSWERS:
        if body.get("assignment_id") in ids:
            body = {**body, "assignment_id": ids[body["assignment_id"]]}
        got, _, _, data = fx.call(server.url, "POST", "/api/answer", token=tokens["alice"], body=body)
        assert got == status, (body, data)
        assert isinstance(data["error"], str) and data["error"]
        if body.get("position") == 0 and "extra" not in body:  # the id is what is wrong: skip refuses it too
            got, _, _, data = fx.call(server.url, "POST", "/api/skip", token=tokens["alice"],
                                      body={k: v for k, v in body.items() if k != "position"})
            assert got == status, (body, data)
    assert store.answers() == [] and store.progress(store.labelers()[0])["mine"] == 0
    assert answer(server, tokens["alice"], ids["OWN"], 3)[0] == 200  # the lease is still open after all that


def test_malformed_bodies_and_answered_ids(served):
    server, store, tokens = served
    alice = tokens["alice"]
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, _, _, data = fx.call(server.url, "POST", "/api/answer", token=alice, raw_body=raw,
                                     headers={"Content-Type": "application/json"})
        assert status == 400, raw
    a = next_of(server, alice)["assignment"]
    assert answer(server, alice, a["id"], 0)[0] == 200
    status, _, _, data = answer(server, alice, a["id"], 1)  # the same item again (a double press)
    assert status == 409 and "answered" in data["error"]
    assert fx.call(server.url, "POST", "/api/skip", token=alice, body={"assignment_id": a["id"]})[0] == 409
    assert fx.call(server.url, "POST", "/api/undo", token=alice, body={"x": 1})[0] == 400
    assert fx.call(server.url, "GET", "/api/answer", token=alice)[0] == 405
    assert fx.call(server.url, "GET", "/api/nothing", token=alice)[0] == 404
    assert [(x["uid"], x["choice_position"]) for x in store.answers()] == [(a["uid"], 0)]


TRAVERSALS = [
    "/static/../store.py", "/static/%2e%2e/store.py", "/static/..%2fstore.py", "/static/%2e%2e%2fapp.py",
    "/static/..%5capp.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/....//app.py",
    "/../lm_human_preferences/labeling/store.py", "/static/../templates/label.html", "/templates/label.html",
    "/static/%00", "/static/label.js%00.py", "/static/.", "/static/", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]


def test_no_request_path_reaches_the_filesystem_outside_static(served):
    server, _, tokens = served
    for path in TRAVERSALS:
        for token in (None, tokens["alice"]):
            status, _, body, _ = fx.call(server.url, "GET", path, token=token)
            assert status in (400, 401, 404, 405), (path, status)
            assert b"LabelStore" not in body and b"root:" not in body and b"{%" not in body


def test_admin_stats(served):
    server, store, tokens = served
    for name, position in (("alice", 0), ("bob", 1), ("alice", 2)):
        a = next_of(server, tokens[name])["assignment"]
        assert answer(server, tokens[name], a["id"], position)[0] == 200
    status, _, _, data = fx.call(server.url, "GET", "/api/admin/stats", token=tokens["admin"])
    assert status == 200 and data == json.loads(json.dumps(store.admin_stats()))
    assert data["labelers"]["alice"]["answers"] == 2 and data["position_wins"] == [1, 1, 1, 0]
    status, _, body, _ = fx.call(server.url, "GET", "/admin", headers={"Cookie": f"lmhp_admin={tokens['admin']}"})
    page = body.decode()
    assert status == 200 and "3 of 7 answers" in page
    assert "<tr><td>alice</td><td>2</td>" in page and "<tr><td>bob</td><td>1</td>" in page


def test_serve_refuses_a_public_host_without_labelers(tmp_path, capsys):
    store = fx.make_store(tmp_path / "store.db", 1)
    assert label_app.check_host(store, "127.0.0.1") is None and label_app.check_host(store, "localhost") is None
    assert label_app.check_host(store, "::1") is None
    with pytest.raises(StoreError, match="no labeler yet.*add-labeler"):
        label_app.serve(tmp_path / "store.db", host="0.0.0.0", port=0)  # refused before listening
    store.add_labeler("alice")
    assert "every page needs a labeler's or the admin's token" in label_app.check_host(store, "0.0.0.0")
    with pytest.raises(StoreError, match="does not exist"):
        label_app.serve(tmp_path / "missing.db", port=0)
    with pytest.raises(StoreError, match="--lease"):
        label_app.serve(tmp_path / "store.db", port=0, lease_seconds=0)
    taken = fx.free_socket()
    try:
        with pytest.raises(StoreError, match="choose another --port"):
            label_app.serve(tmp_path / "store.db", port=taken.getsockname()[1])
    finally:
        taken.close()
    assert capsys.readouterr().out == ""  # nothing served, nothing printed
