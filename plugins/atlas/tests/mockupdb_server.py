#!/usr/bin/env python3
"""A MongoDB wire-protocol stand-in for `tests/wire.rs`, built on MockupDB.

Run by the Rust test, not by hand (but `python3 mockupdb_server.py` works: type Ctrl-D to stop).
It listens on 127.0.0.1 on a free port and prints, one per line, flushed:

  READY <port>                      once it listens
  COMMAND <hex BSON> <canonical extended JSON>
                                    for every command it receives, except the handshake
  MISSING <what>                    (exit 3) when MockupDB is not installed

It answers the handshake (`hello` / legacy `isMaster`) as a MongoDB 7.0 standalone
(maxWireVersion 21; the Rust driver 3.x needs at least 8); a `$vectorSearch` aggregation with
the canned results below; `createSearchIndexes` with the created index; `$listSearchIndexes`
with a READY, queryable index; `find`, `insert`, `update`, `delete` and `count_documents` over
an in-memory store (enough of them for an ingest); anything else with `{ok: 1}`. It exits when
its standard input closes (the test dropping it).

Needs: python3 -m pip install mockupdb==1.8.1 (it brings pymongo, for `bson`).
"""

import sys
import threading

try:
    import bson
    from bson import Int64, ObjectId, json_util
    from bson.json_util import CANONICAL_JSON_OPTIONS
    from mockupdb import MockupDB
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(f"MISSING {exc}", flush=True)
    sys.exit(3)

# What a `$vectorSearch` + `$project` answers: one document written by `prompter kb ingest`,
# one written by another tool (ObjectId `_id`, no `text`, structured `data`).
CANNED_RESULTS = [
    {
        "_id": "3f2a9c1b7d4e",
        "text": "Budget Constraints: it's too expensive",
        "data": "Quantify the cost of the current process and offer a phased rollout.",
        "score": 0.9375,
    },
    {
        "_id": ObjectId("65f1c0ffee00000000000001"),
        "data": {"tip": "Offer a pilot", "weeks": 4},
        "score": 0.5,
    },
]

_print_lock = threading.Lock()


def emit(line):
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Collections:
    """Just enough of a document store for the commands the `atlas` store sends: `_id`
    equality, `$in`, `$nin`, `$ne` and `$exists` filters on top-level fields."""

    def __init__(self):
        self.lock = threading.Lock()
        self.docs = {}  # namespace -> {_id: document}

    def coll(self, ns):
        return self.docs.setdefault(ns, {})

    @staticmethod
    def matches(doc, query):
        for key, cond in query.items():
            present = key in doc
            value = doc.get(key)
            if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
                for op, arg in cond.items():
                    if op == "$in" and value not in arg:
                        return False
                    if op == "$nin" and value in arg:
                        return False
                    if op == "$ne" and value == arg:
                        return False
                    if op == "$exists" and present != bool(arg):
                        return False
            elif not present or value != cond:
                return False
        return True

    @staticmethod
    def project(doc, projection):
        if not projection:
            return doc
        keep = [k for k, v in projection.items() if v]
        return {k: doc[k] for k in ["_id"] + keep if k in doc}


STORE = Collections()


def handle(request):
    doc = request.doc
    name = next(iter(doc)).lower() if doc else ""
    if name in ("ismaster", "hello"):
        return request.ok(
            ismaster=True,
            isWritablePrimary=True,
            helloOk=True,
            minWireVersion=0,
            maxWireVersion=21,
            maxBsonObjectSize=16 * 1024 * 1024,
            maxMessageSizeBytes=48_000_000,
            maxWriteBatchSize=100_000,
            logicalSessionTimeoutMinutes=30,
            connectionId=1,
        )
    # Hex of the exact BSON (types and key order), then the same as JSON for people.
    emit("COMMAND " + bson.encode(doc).hex() + " "
         + json_util.dumps(doc, json_options=CANONICAL_JSON_OPTIONS))
    ns = f"{doc.get('$db', 'test')}.{doc.get(next(iter(doc)))}"
    with STORE.lock:
        coll = STORE.coll(ns)
        if name == "aggregate":
            pipeline = doc.get("pipeline") or [{}]
            first = pipeline[0]
            if "$listSearchIndexes" in first:
                wanted = first["$listSearchIndexes"].get("name", "vector_index")
                batch = [{"id": "6600", "name": wanted, "type": "vectorSearch",
                          "status": "READY", "queryable": True}]
            elif any("$group" in stage for stage in pipeline):  # count_documents
                query = first.get("$match", {})
                n = sum(1 for d in coll.values() if STORE.matches(d, query))
                batch = [{"_id": 1, "n": n}] if n else []
            else:
                batch = CANNED_RESULTS
            return request.ok(cursor={"id": Int64(0), "ns": ns, "firstBatch": batch})
        if name == "find":
            query = doc.get("filter", {})
            batch = [STORE.project(d, doc.get("projection"))
                     for d in coll.values() if STORE.matches(d, query)]
            return request.ok(cursor={"id": Int64(0), "ns": ns, "firstBatch": batch})
        if name == "insert":
            errors = []
            for i, d in enumerate(doc.get("documents", [])):
                if d["_id"] in coll:
                    errors.append({"index": i, "code": 11000,
                                   "errmsg": "E11000 duplicate key error"})
                else:
                    coll[d["_id"]] = d
            n = len(doc.get("documents", [])) - len(errors)
            return request.ok(n=n, writeErrors=errors) if errors else request.ok(n=n)
        if name == "update":
            n = 0
            for u in doc.get("updates", []):
                target = u["q"]["_id"]
                if target in coll or u.get("upsert"):
                    coll[target] = dict(u["u"], _id=target)
                    n += 1
            return request.ok(n=n, nModified=n)
        if name == "delete":
            n = 0
            for d in doc.get("deletes", []):
                gone = [k for k, v in coll.items() if STORE.matches(v, d["q"])]
                for k in gone:
                    del coll[k]
                n += len(gone)
            return request.ok(n=n)
        if name == "drop":
            STORE.docs.pop(ns, None)
            return request.ok()
    if name == "createsearchindexes":
        created = [{"id": "6600", "name": i.get("name", "default")} for i in doc["indexes"]]
        return request.ok(indexesCreated=created)
    return request.ok()


def main():
    server = MockupDB(port=None, request_timeout=30)
    server.autoresponds(handle)
    port = server.run()
    emit(f"READY {port}")
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
