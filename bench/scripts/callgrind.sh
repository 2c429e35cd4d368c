#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable on a busy machine, where
# req/s and even CPU time per request are not. See bench/PROFILE.md §8.
#
#   bench/scripts/callgrind.sh NAME SECONDS PORT -- COMMAND...
#
# Needs valgrind, wrk and nginx, and an upstream answering on 127.0.0.1:7800 (start one with
# `bench/scripts/callgrind.sh --upstream`). COMMAND must listen on 127.0.0.1:PORT and proxy to
# that upstream. It runs under callgrind; after 5 s of warm-up at 16 connections the counters
# are zeroed, wrk drives it for SECONDS at 16 connections, the counters are dumped, and the
# instructions of that window are divided by the requests wrk completed in it (the ≤ 16
# requests in flight when wrk stops are a 0.1 % error at 15,000 requests).
set -euo pipefail
dir=${CALLGRIND_DIR:-/tmp/sidecar-callgrind}
mkdir -p "$dir"
if [ "${1:-}" = "--upstream" ]; then
  mkdir -p "$dir/tmp"
  cat > "$dir/upstream.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/upstream.pid;
error_log $dir/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/b; proxy_temp_path $dir/tmp/p; fastcgi_temp_path $dir/tmp/f;
  uwsgi_temp_path $dir/tmp/u; scgi_temp_path $dir/tmp/s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:7800;
    location / { default_type application/json; return 200 '{"ok":true,"n":1234567890}\n'; }
  }
}
CONF
  exec nginx -p "$dir" -c "$dir/upstream.conf"
fi
name=$1; secs=$2; port=$3; shift 4
out=$dir/$name.out
rm -f "$out" "$out".*
valgrind --tool=callgrind --callgrind-out-file="$out" "$@" > "$dir/$name.log" 2>&1 &
vpid=$!
for _ in $(seq 1 600); do curl -s -o /dev/null "127.0.0.1:$port/bench" && break; sleep 0.5; done
wrk -t1 -c16 -d5s --timeout 60s "http://127.0.0.1:$port/bench" > "$dir/$name.warm" 2>&1
callgrind_control --zero "$vpid" > /dev/null
wrk -t1 -c16 -d"${secs}s" --timeout 60s "http://127.0.0.1:$port/bench" > "$dir/$name.wrk" 2>&1
callgrind_control --dump=measured "$vpid" > /dev/null
kill -TERM "$vpid"; wait "$vpid" || true
reqs=$(grep -oE '^ +[0-9]+ requests' "$dir/$name.wrk" | awk '{print $1}')
file=$(ls "$out".* | head -1)
ir=$(grep -E '^summary:' "$file" | awk '{print $2}')
echo "$name requests=$reqs instructions=$ir per_request=$(( ir / reqs )) profile=$file"
