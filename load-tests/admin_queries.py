#!/usr/bin/env python3
"""The admin key listing at scale: fill a store with realistic keys, then time
`GET /v1/keys` with each filter through a running admin API.

    # 1. a control plane creates the schema (start it once on the empty store), then:
    load-tests/admin_queries.py generate --store postgres://postgres@127.0.0.1:5432/keygate_scale --keys 1000000
    load-tests/admin_queries.py generate --store sqlite:///tmp/scale/cp.db --keys 1000000
    # 2. with the control plane running on that store:
    load-tests/admin_queries.py measure --url http://127.0.0.1:9090 --token "$KEYGATE_ADMIN_TOKEN"

`generate` appends --keys keys after the ones already there (run it again with
--start N to grow a store from N keys): 10,000 owners (skewed: org-00000 holds
about 4.6 % of the keys, org-09999 about 0.003 %), plans free/pro/enterprise
60/30/10 %, status active/disabled/revoked 90/8/2 %, and 39 tags (an environment
and a region on every key, one of 30 teams on 70 %, beta 5 %, legacy 1 %,
pci 0.01 %). Keys are created 6 s apart, newest last. Only the keys table is
written (the change feed and the audit log stay empty). PostgreSQL goes through
`psql` (COPY in one transaction that drops the secondary indexes first and
rebuilds them after, then VACUUM ANALYZE, as autovacuum would soon); SQLite through
Python's sqlite3 module (likewise, without ANALYZE: the store runs none). On a
schema with migration 0003 the triggers of `keys` are off during the load and
`key_tags` and the search index are filled in one statement each.

`measure` runs each query --calls times (7) on one keep-alive connection and
prints the median, min and max in ms, checking that every key returned matches
its filter and that pages are newest first. `--json FILE` also writes the rows.
Python standard library only (plus `psql` for PostgreSQL stores).
"""

import argparse
import datetime
import hashlib
import http.client
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
OWNERS = 10_000
PLANS = [("free", 0.60), ("pro", 0.30), ("enterprise", 0.10)]
STATUSES = [("active", 0.90), ("disabled", 0.08), ("revoked", 0.02)]
ENVS = [("prod", 0.60), ("staging", 0.30), ("dev", 0.10)]
REGIONS = [("eu", 0.45), ("us", 0.45), ("apac", 0.10)]
TEAMS = [f"team-{n:02d}" for n in range(30)]
SERVICES = [
    "billing", "checkout", "reporting", "search", "inventory", "shipping", "payments", "ledger",
    "catalog", "pricing", "identity", "notifications", "analytics", "orders", "returns", "support",
    "loyalty", "fraud", "tax", "invoicing", "warehouse", "partners", "mobile", "web", "crm", "erp",
    "export", "import", "sync", "webhooks", "audit", "exports", "ingest", "metrics", "alerts",
    "scheduler", "gateway", "portal", "backoffice", "kiosk",
]
# 2024-01-01T00:00:00Z; keys are created STEP_MS apart.
BASE_MS = 1_704_067_200_000
STEP_MS = 6_000
COLUMNS = [
    "id", "hash", "prefix", "masked", "name", "owner", "plan", "scopes", "ip_allowlist", "rate_limit", "quota",
    "status", "expires_at", "metadata", "tags", "created_at", "updated_at", "last_used_at", "version",
]


def pick(rng, weighted):
    x = rng.random()
    for value, weight in weighted:
        if x < weight:
            return value
        x -= weight
    return weighted[-1][0]


def key_rows(start, count, seed):
    """Rows of `keys`, in COLUMNS order, for key numbers start..start+count."""
    rng = random.Random(f"{seed}:{start}")
    choices = rng.choices
    for i in range(start, start + count):
        created = BASE_MS + i * STEP_MS
        owner = f"org-{int(OWNERS * rng.random() ** 3):05d}"
        env = pick(rng, ENVS)
        tags = [env, pick(rng, REGIONS)]
        if rng.random() < 0.70:
            tags.append(TEAMS[rng.randrange(len(TEAMS))])
        if rng.random() < 0.05:
            tags.append("beta")
        if rng.random() < 0.01:
            tags.append("legacy")
        if rng.random() < 0.0001:
            tags.append("pci")
        body = "".join(choices(BASE62, k=4))
        tail = "".join(choices(BASE62, k=4))
        yield (
            "key_" + "".join(choices(BASE62, k=20)),
            "sha256:" + hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(),
            "kg_live",
            f"kg_live_{body}\u2026{tail}",
            f"{SERVICES[rng.randrange(len(SERVICES))]}-{env} {rng.randrange(1000)}",
            owner,
            pick(rng, PLANS),
            '["orders:read"]',
            "[]",
            None,
            None,
            pick(rng, STATUSES),
            None,
            "{}",
            json.dumps(tags),
            created,
            created,
            None,
            i + 1,
        )


def tsv(row):
    return "\t".join("\\N" if v is None else str(v) for v in row) + "\n"


def psql(url, sql, stdin=None):
    result = subprocess.run(
        ["psql", url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql] if stdin is None
        else ["psql", url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"],
        input=stdin, capture_output=True, text=True,
    )
    if result.returncode != 0:
        sys.exit(f"psql failed: {result.stderr.strip()}")
    return result.stdout


def generate_postgres(url, start, count, seed):
    # Secondary indexes are dropped and rebuilt around the load, and the triggers that keep
    # key_tags (migration 0003) are off during it, with key_tags filled by one statement
    # instead: building an index once is far cheaper than 10 M inserts into it.
    defs = psql(url, "SELECT indexname || '\t' || indexdef FROM pg_indexes WHERE schemaname = 'public' "
                     "AND tablename IN ('keys', 'key_tags') "
                     "AND indexname NOT IN (SELECT conname FROM pg_constraint) ORDER BY indexname")
    indexes = [line.split("\t", 1) for line in defs.splitlines() if line]
    tags_pkey = psql(url, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'key_tags_pkey'").strip()
    proc = subprocess.Popen(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"],
                            stdin=subprocess.PIPE, text=True)
    write = proc.stdin.write
    write("SET LOCAL maintenance_work_mem = '1GB';\n")
    for name, _ in indexes:
        write(f'DROP INDEX "{name}";\n')
    if tags_pkey:
        write("ALTER TABLE key_tags DROP CONSTRAINT key_tags_pkey;\n")
        write("ALTER TABLE keys DISABLE TRIGGER USER;\n")
    write(f"COPY keys ({', '.join(COLUMNS)}) FROM STDIN;\n")
    for row in key_rows(start, count, seed):
        write(tsv(row))
    write("\\.\n")
    if tags_pkey:
        # What the triggers would have written for these keys (see migration 0003).
        write("INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan) "
              "SELECT DISTINCT tag, created_at, id, status, owner, plan "
              "FROM keys, jsonb_array_elements_text(keys.tags::jsonb) AS tag "
              f"WHERE created_at >= {BASE_MS + start * STEP_MS};\n")
        write(f"ALTER TABLE key_tags ADD CONSTRAINT key_tags_pkey {tags_pkey};\n")
        write("ALTER TABLE keys ENABLE TRIGGER USER;\n")
    for _, definition in indexes:
        write(definition + ";\n")
    proc.stdin.close()
    if proc.wait() != 0:
        sys.exit("psql failed; nothing was loaded")
    psql(url, "VACUUM ANALYZE keys")
    if tags_pkey:
        psql(url, "VACUUM ANALYZE key_tags")


def generate_sqlite(path, start, count, seed):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA cache_size = -1000000")
    # As on PostgreSQL: secondary indexes and the triggers of keys (migration 0003) come off
    # for the load; key_tags and the search index are then filled in one go each.
    saved = db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name IN ('keys', 'key_tags') AND sql IS NOT NULL "
        "AND type IN ('index', 'trigger')"
    ).fetchall()
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.execute("BEGIN")
    for kind, name, _ in saved:
        db.execute(f'DROP {kind.upper()} "{name}"')
    placeholders = ", ".join("?" for _ in COLUMNS)
    db.executemany(f"INSERT INTO keys ({', '.join(COLUMNS)}) VALUES ({placeholders})", key_rows(start, count, seed))
    if "key_tags" in tables:
        db.execute(
            "INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan) "
            "SELECT DISTINCT tag.value, keys.created_at, keys.id, keys.status, keys.owner, keys.plan "
            "FROM keys, json_each(keys.tags) AS tag WHERE keys.created_at >= ? ORDER BY 1, 2, 3",
            (BASE_MS + start * STEP_MS,),
        )
    if "keys_search" in tables:
        db.execute("INSERT INTO keys_search (keys_search) VALUES ('rebuild')")
    for kind, _, definition in saved:
        db.execute(definition)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def cmd_generate(args):
    started = time.monotonic()
    if args.store.startswith(("postgres://", "postgresql://")):
        generate_postgres(args.store, args.start, args.keys, args.seed)
    elif args.store.startswith("sqlite://"):
        generate_sqlite(args.store[len("sqlite://"):], args.start, args.keys, args.seed)
    else:
        sys.exit("--store: expected postgres://… or sqlite:///path")
    print(f"generated {args.keys:,} keys (numbers {args.start:,} to {args.start + args.keys - 1:,}) "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr)


# ---- measure ----


class Admin:
    def __init__(self, url, token):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.headers = {"Authorization": f"Bearer {token}"}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)

    def list(self, params):
        path = "/v1/keys?" + urllib.parse.urlencode(params)
        started = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        took = (time.perf_counter() - started) * 1000
        if response.status != 200:
            sys.exit(f"GET {path}: {response.status} {body[:300]!r}")
        return json.loads(body), took


def matches(key, params):
    if "owner" in params and key["owner"] != params["owner"]:
        return False
    if "status" in params and key["status"] != params["status"]:
        return False
    if "plan" in params and key["plan"] != params["plan"]:
        return False
    if "tag" in params and params["tag"] not in key["tags"]:
        return False
    if "q" in params:
        needle = params["q"].lower()
        fields = [key["name"], key["owner"] or "", key["id"], key["masked"]]
        if not any(needle in f.lower() for f in fields):
            return False
    return True


EPOCH = datetime.datetime.fromtimestamp(0, datetime.timezone.utc)


def position(key, params):
    """Where a key sorts in the listing: (created_at, id), or in last-use order
    (last_used_at, never used as the epoch, id)."""
    if params.get("sort") == "last_used":
        used = key.get("last_used_at")
        return (datetime.datetime.fromisoformat(used) if used else EPOCH), key["id"]
    return datetime.datetime.fromisoformat(key["created_at"]), key["id"]


def check_page(page, params):
    keys = page["keys"]
    for key in keys:
        if not matches(key, params):
            sys.exit(f"key {key['id']} does not match {params}")
    order = [position(k, params) for k in keys]
    if order != sorted(order, reverse=True):
        sys.exit(f"page for {params} is not in listing order")


def queries(admin):
    """(label, params) of every query timed; needles that must exist are read from the store."""
    newest, _ = admin.list({"limit": 1})
    if not newest["keys"]:
        sys.exit("the store has no keys")
    key = newest["keys"][0]
    return [
        ("first page", {}),
        ("owner, common (org-00000)", {"owner": "org-00000"}),
        ("owner, rare (org-09999)", {"owner": "org-09999"}),
        ("status=active", {"status": "active"}),
        ("status=revoked", {"status": "revoked"}),
        ("plan=free", {"plan": "free"}),
        ("plan=enterprise", {"plan": "enterprise"}),
        ("tag=prod", {"tag": "prod"}),
        ("tag=pci (0.01 %)", {"tag": "pci"}),
        ("tag=prod + status=revoked", {"tag": "prod", "status": "revoked"}),
        ("tag=pci + status=disabled", {"tag": "pci", "status": "disabled"}),
        ("owner common + status=revoked", {"owner": "org-00000", "status": "revoked"}),
        ("plan=enterprise + status=disabled", {"plan": "enterprise", "status": "disabled"}),
        ("owner + tag + status", {"owner": "org-00000", "tag": "team-07", "status": "active"}),
        ("tag=prod + owner rare", {"tag": "prod", "owner": "org-09999"}),
        ("tag=beta + plan=enterprise", {"tag": "beta", "plan": "enterprise"}),
        ("q common (billing)", {"q": "billing"}),
        ("q rare (8 chars of an id)", {"q": key["id"][6:14]}),
        ("q rare owner (org-09999)", {"q": "org-09999"}),
        ("q 5 chars, rare (zzqxv)", {"q": "zzqxv"}),
        ("q 2 chars (ab)", {"q": "ab"}),
        ("q + status=revoked", {"q": "billing", "status": "revoked"}),
        ("sort=last_used", {"sort": "last_used"}),
        ("sort=last_used + status=active", {"sort": "last_used", "status": "active"}),
    ]


def cmd_measure(args):
    admin = Admin(args.url, args.token)
    rows = []
    print(f"{'query':<36} {'keys':>5} {'median ms':>10} {'min':>8} {'max':>8} {'page 2 ms':>10}")
    for label, params in queries(admin):
        params = {**params, "limit": args.limit}
        times, page2 = [], []
        for _ in range(args.calls):
            page, took = admin.list(params)
            times.append(took)
            check_page(page, params)
            if page["next_cursor"]:
                second, took2 = admin.list({**params, "cursor": page["next_cursor"]})
                check_page(second, params)
                if second["keys"] and position(second["keys"][0], params) >= position(page["keys"][-1], params):
                    sys.exit(f"page 2 of {params} does not follow page 1")
                page2.append(took2)
        row = {
            "query": label, "params": params, "keys": len(page["keys"]),
            "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "page2_median_ms": statistics.median(page2) if page2 else None,
        }
        rows.append(row)
        p2 = f"{row['page2_median_ms']:10.1f}" if page2 else f"{'-':>10}"
        print(f"{label:<36} {row['keys']:>5} {row['median_ms']:10.1f} {row['min_ms']:8.1f} {row['max_ms']:8.1f} {p2}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="append realistic keys to a store")
    gen.add_argument("--store", required=True, help="postgres://… or sqlite:///path/to/file.db (schema already there)")
    gen.add_argument("--keys", type=int, required=True)
    gen.add_argument("--start", type=int, default=0, help="number of the first key (keys already generated)")
    gen.add_argument("--seed", default="keygate")
    gen.set_defaults(run=cmd_generate)
    meas = sub.add_parser("measure", help="time GET /v1/keys with every filter")
    meas.add_argument("--url", required=True, help="admin API, e.g. http://127.0.0.1:9090")
    meas.add_argument("--token", required=True, help="an admin token")
    meas.add_argument("--calls", type=int, default=7)
    meas.add_argument("--limit", type=int, default=50)
    meas.add_argument("--json", help="also write the results here")
    meas.set_defaults(run=cmd_measure)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
