-- wrk script for benchmarks/http.py: POST /v1/completions, a random X-API-Key per request out
-- of KEYS (100,000) distinct ones, the same JSON body as the hey load.
--
-- Run:  wrk -t1 -c50 -d10s -s benchmarks/http_wrk_random_key.lua \
--            http://127.0.0.1:PORT/v1/completions [-- KEY_PREFIX]
-- Keys are KEY_PREFIX .. n (default prefix "bench-key-"; the warm-up uses another one).
--
-- done() prints ONE line starting with "HTTPBENCH" of key=value pairs (latencies in
-- microseconds), parsed by benchmarks/http.py: requests, duration_us, p50_us, p99_us, non2xx
-- (responses outside 200-299), status_<code> per status seen, socket errors, and the number of
-- requests generated ("sent") and of distinct keys among them ("distinct").

local KEYS = 100000
local BODY = '{"prompt":"hi"}'

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  threads[#threads + 1] = thread
end

function init(args)
  prefix = args[1] or "bench-key-"
  math.randomseed(os.time() * 1000 + id)
  seen = {}
  sent = 0
  distinct = 0
  non2xx = 0
  statuses = {}
end

function request()
  local n = math.random(1, KEYS)
  sent = sent + 1
  if not seen[n] then
    seen[n] = true
    distinct = distinct + 1
  end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-API-Key"] = prefix .. n,
  }, BODY)
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total_sent, total_distinct, total_non2xx = 0, 0, 0
  local codes = {}
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_distinct = total_distinct + thread:get("distinct")
    total_non2xx = total_non2xx + thread:get("non2xx")
    for code, count in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + count
    end
  end
  local e = summary.errors
  local parts = {
    "HTTPBENCH",
    string.format("requests=%d", summary.requests),
    string.format("duration_us=%d", summary.duration),
    string.format("bytes=%d", summary.bytes),
    string.format("p50_us=%d", latency:percentile(50)),
    string.format("p90_us=%d", latency:percentile(90)),
    string.format("p99_us=%d", latency:percentile(99)),
    string.format("mean_us=%.1f", latency.mean),
    string.format("max_us=%d", latency.max),
    string.format("non2xx=%d", total_non2xx),
    string.format("errors_connect=%d", e.connect),
    string.format("errors_read=%d", e.read),
    string.format("errors_write=%d", e.write),
    string.format("errors_timeout=%d", e.timeout),
    string.format("errors_status=%d", e.status),
    string.format("sent=%d", total_sent),
    string.format("distinct=%d", total_distinct),
  }
  for code, count in pairs(codes) do
    parts[#parts + 1] = string.format("status_%d=%d", code, count)
  end
  io.write(table.concat(parts, " ") .. "\n")
end
