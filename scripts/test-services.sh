#!/usr/bin/env bash
# Install (as root, via apt-get, only when missing) and start what the tests need:
# dcmtk, PostgreSQL, Redis. Reuses services already running; never uses systemd.
set -euo pipefail

need_apt=()
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
# Orthanc with its DICOMweb plugin pulls studies from us in the interoperability test.
[[ -x /usr/sbin/Orthanc ]] || need_apt+=(orthanc)
[[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need_apt+=(orthanc-dicomweb)
# The viewer's end-to-end tests drive Debian's Chromium through Playwright (never a download).
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium)

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} — install them (apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  echo "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "service on port $1 did not come up" >&2; return 1
}

if ! port_open 5432; then
  echo "starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -1)
  if [[ -z "$version" ]]; then echo "no PostgreSQL cluster configured" >&2; exit 1; fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432
fi
# The fixtures connect as postgres over loopback without a password (trust), as on the
# machines the project runs on. A cluster this script just installed uses password auth
# on loopback: give the postgres role trust on 127.0.0.1 only, for that cluster only.
if [[ -z "${DGW_TEST_POSTGRES_URL:-}" ]] && \
   ! psql -h 127.0.0.1 -U postgres -d postgres -c "select 1" >/dev/null 2>&1; then
  if [[ " ${need_apt[*]:-} " == *" postgresql "* ]]; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  else
    echo "PostgreSQL on 127.0.0.1:5432 refuses user postgres without a password:" >&2
    echo "set DGW_TEST_POSTGRES_URL to an admin URL that can CREATE DATABASE" >&2
    exit 1
  fi
fi

if ! port_open 6379; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/dgw-redis.log
  wait_port 6379
fi
echo "services ready: dcmtk, Orthanc, PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379"
