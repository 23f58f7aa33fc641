-- wrk script for benchmarks/gateway.py: the check before any measurement, that what wrk counts
-- as one request is one whole answer. The same request as gateway_wrk.lua, but with a
-- response() function, so that wrk hands every answer's (de-chunked) body to Lua: slower, which
-- is why the measured runs use gateway_wrk.lua instead.
--
-- Run:  wrk -t1 -c1 -d1s -s benchmarks/gateway_wrk_check.lua URL -- KEY BODY
--
-- done() prints ONE line starting with "GATEWAYCHECK" of key=value pairs: responses (answers
-- seen by response()), non2xx, events_min / events_max (SSE "data:" lines per answer: 0 for a
-- JSON answer), done (answers whose body holds "data: [DONE]"), body_bytes (de-chunked bodies,
-- summed) and requests / bytes (wrk's own counts: every byte read, heads and chunk framing
-- included, the figure the measured runs report too).

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  wrk.body = args[2]
  responses = 0
  non2xx = 0
  events_min = -1
  events_max = -1
  done_count = 0
  body_bytes = 0
end

function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  local _, events = string.gsub("\n" .. body, "\ndata:", "")
  if events_min < 0 or events < events_min then
    events_min = events
  end
  if events > events_max then
    events_max = events
  end
  if string.find(body, "data: [DONE]", 1, true) then
    done_count = done_count + 1
  end
  body_bytes = body_bytes + #body
end

function done(summary, latency, requests)
  local totals = {responses = 0, non2xx = 0, done = 0, body_bytes = 0}
  local low, high = -1, -1
  for _, thread in ipairs(threads) do
    totals.responses = totals.responses + thread:get("responses")
    totals.non2xx = totals.non2xx + thread:get("non2xx")
    totals.done = totals.done + thread:get("done_count")
    totals.body_bytes = totals.body_bytes + thread:get("body_bytes")
    local tmin, tmax = thread:get("events_min"), thread:get("events_max")
    if tmin >= 0 and (low < 0 or tmin < low) then
      low = tmin
    end
    if tmax > high then
      high = tmax
    end
  end
  io.write(table.concat({
    "GATEWAYCHECK",
    string.format("responses=%d", totals.responses),
    string.format("non2xx=%d", totals.non2xx),
    string.format("events_min=%d", low),
    string.format("events_max=%d", high),
    string.format("done=%d", totals.done),
    string.format("body_bytes=%d", totals.body_bytes),
    string.format("requests=%d", summary.requests),
    string.format("bytes=%d", summary.bytes),
  }, " ") .. "\n")
end
