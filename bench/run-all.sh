#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md: all scenarios on SQLite and on PostgreSQL at 100
# connections, the acl and native checks in five rounds beside baseline, then baseline and
# acl-confirm against the connection count, and draws the plot.
# Each run is bounded (--duration); the whole script took 28-30 minutes on 2026-12-05.
# Usage: bench/run-all.sh [postgres-url]   (default: the local server, TLS off on loopback)
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL="${1:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}"
OUT=bench/results
mkdir -p "$OUT"
cargo build --release -p otpgate -p otpgate-bench
BENCH=target/release/otpgate-bench
ALL=baseline,acl-confirm,v1-check,digipay-verify,totp-confirm,wrong-code,login,send

# Enough fixtures that no check scenario runs out of them before its 10 seconds are up
# (`v1-check` checked 43,000 codes a second on SQLite and 24,000 on PostgreSQL on 2026-12-04,
# evening: 400,000 SQLite fixtures ran out at 9.2 s, and 250,000 on PostgreSQL nearly did).
timeout 1200 $BENCH run --scenarios "$ALL" --connections 100 --duration 10 \
  --fixtures 500000 --json "$OUT/sqlite.json"
timeout 1200 $BENCH run --postgres "$PG_URL" --scenarios "$ALL" --connections 100 \
  --duration 10 --fixtures 300000 --json "$OUT/postgres.json"
# The same checks with a million dead challenges in the table (written in bulk first; on
# PostgreSQL that takes several minutes), and the plans of every hot and sweep statement.
timeout 900 $BENCH run --scenarios v1-check,acl-confirm --connections 100 --duration 10 \
  --fixtures 450000 --dead-challenges 1000000 --plans --json "$OUT/sqlite-dead.json"
timeout 1500 $BENCH run --postgres "$PG_URL" --scenarios v1-check --connections 100 \
  --duration 10 --fixtures 300000 --dead-challenges 1000000 --plans --json "$OUT/postgres-dead.json"
# Five rounds of baseline and the checks in turn: on 2026-12-05 a slow window moved a single
# run's ratio by a third (every thread's CPU a request half as much again); each round pairs a
# scenario with the baseline taken just before it, and one slow minute moves one round of five,
# not their median. 450,000 / 200,000 fixtures last each 10-second run.
timeout 1200 $BENCH run --scenarios baseline,acl-confirm,v1-check --rounds 5 --connections 100 \
  --duration 10 --fixtures 450000 --json "$OUT/rounds-sqlite.json"
timeout 1800 $BENCH run --postgres "$PG_URL" --scenarios baseline,acl-confirm --rounds 5 \
  --connections 100 --duration 10 --fixtures 200000 --json "$OUT/rounds-postgres.json"
# 5 s each: SQLite's acl-confirm logged in 28,000 times a second and PostgreSQL's 14,700 at
# 200 connections on 2026-12-04, evening, and both ran out of 120,000 and 60,000 fixtures.
timeout 900 $BENCH run --scenarios baseline,acl-confirm --connections 1,10,50,100,200 \
  --duration 5 --fixtures 160000 --json "$OUT/sweep-sqlite.json"
timeout 1200 $BENCH run --postgres "$PG_URL" --scenarios baseline,acl-confirm \
  --connections 1,10,50,100,200 --duration 5 --fixtures 90000 --json "$OUT/sweep-postgres.json"
$BENCH plot "$OUT/sweep-sqlite.json" "$OUT/sweep-postgres.json" --out bench/plot.svg
