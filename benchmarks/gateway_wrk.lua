-- wrk script for benchmarks/gateway.py: every measured load. One request (the JSON body given,
-- streamed or not) rendered once per thread: no request() or response() function, so wrk runs
-- in its fast static mode and leaves the most of the load core to the model server beside it.
-- wrk counts a request when its whole answer has arrived (the last chunk of a stream), so a
-- stream is one request; gateway_wrk_check.lua checks that before the measured runs.
--
-- Run:  wrk -t1 -c10 -d10s -s benchmarks/gateway_wrk.lua URL -- KEY BODY
--
-- done() prints ONE line starting with "GATEWAYBENCH" of key=value pairs (latencies in
-- microseconds): requests, duration_us, bytes (every byte read), p50_us, p99_us, non2xx
-- (responses outside 200-399, as wrk counts them) and socket errors.

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  wrk.body = args[2]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(table.concat({
    "GATEWAYBENCH",
    string.format("requests=%d", summary.requests),
    string.format("duration_us=%d", summary.duration),
    string.format("bytes=%d", summary.bytes),
    string.format("p50_us=%d", latency:percentile(50)),
    string.format("p99_us=%d", latency:percentile(99)),
    string.format("non2xx=%d", e.status),
    string.format("errors_connect=%d", e.connect),
    string.format("errors_read=%d", e.read),
    string.format("errors_write=%d", e.write),
    string.format("errors_timeout=%d", e.timeout),
  }, " ") .. "\n")
end
