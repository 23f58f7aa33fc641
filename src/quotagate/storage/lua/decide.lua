-- quotagate: decide every limit of one request, all or nothing, in one call.
-- The twin of algorithms/*.py (same integer microsecond arithmetic; see MemoryStorage.decide).
--
-- KEYS[1..n]  state key of each limit, in ARGV order
-- KEYS[n+1]   the concurrency lease set, when a lease is asked
-- ARGV[1]     now in microseconds, or "" to read the server's TIME (the default: instances with
--             skewed clocks agree). A client-supplied time is for tests and sets no expiry.
-- ARGV[2]     n, the number of limits
-- ARGV[3..]   4 per limit: algorithm (1 GCRA, 2 fixed window, 3 calendar window), capacity,
--             interval_us (GCRA emission interval | window length | calendar period code), cost
-- A GCRA state is "tat interval_us", a fixed window's "window_end count"
-- then, when a lease is asked: lease limit, ttl_us (0 only reads), lease id
-- then, to count a rejection: "T", ttl_ms, field, increment, ... (the hash's key last in KEYS)
--
-- Returns {verdict, lease_granted, now_us, then per limit and for the lease:
--          remaining, reset_after_us, retry_after_us}; on a rejection, remaining and
--          reset_after are as things stand (nothing was spent)
--   verdict: 0 allowed (everything stored), 1 limited, 2 too large (nothing stored)

--@include calendar

local now
if ARGV[1] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local expire = ARGV[1] == ""
local n = tonumber(ARGV[2])
-- A tally: its key last in KEYS; ARGV[at] is "T", then its ttl in ms, then field, increment
local function tally(at)
  local key = KEYS[#KEYS]
  for j = at + 2, #ARGV, 2 do
    redis.call("HINCRBY", key, ARGV[j], ARGV[j + 1])
  end
  if expire then redis.call("PEXPIRE", key, ARGV[at + 1]) end
end

local verdict = 0
local out = {0, 0, now}
local writes = {}
local unspent = {}  -- {index in out, remaining, reset_after} of each limit if nothing is spent

for i = 1, n do
  local a = 3 + (i - 1) * 4
  local algorithm = tonumber(ARGV[a])
  local capacity = tonumber(ARGV[a + 1])
  local interval = tonumber(ARGV[a + 2])
  local cost = tonumber(ARGV[a + 3])
  local key = KEYS[i]
  local v, remaining, reset_after, retry_after
  if algorithm == 1 then
    local tat
    local stored = redis.call("GET", key)
    if stored then
      -- "tat interval": a state written under another rate holds the same units at this one
      local t, written_at = string.match(stored, "^(%d+) (%d+)$")
      tat, written_at = tonumber(t), tonumber(written_at)
      if tat and written_at ~= interval and tat > now then
        -- stored at once, whatever the verdict: from now on it refills at the new rate
        tat = now + math.ceil((tat - now) * interval / written_at)
        local value = string.format("%d %d", tat, interval)
        if expire then
          redis.call("SET", key, value, "PX", math.max(1, math.ceil((tat - now) / 1000)))
        else
          redis.call("SET", key, value)
        end
      end
    end
    local base = now
    if tat and tat > now then base = tat end
    local tolerance = capacity * interval
    if cost > capacity then
      v, reset_after, retry_after = 2, base - now, 0
      remaining = math.max(0, math.floor((tolerance - (base - now)) / interval))
    else
      local new_tat = base + cost * interval
      if new_tat - now <= tolerance then
        v, reset_after, retry_after = 0, new_tat - now, 0
        remaining = math.floor((tolerance - (new_tat - now)) / interval)
        if cost > 0 then
          writes[#writes + 1] = {key, 1, string.format("%d %d", new_tat, interval), new_tat - now}
          unspent[#unspent + 1] = {#out + 1, math.floor((tolerance - (base - now)) / interval), base - now}
        end
      else
        v, reset_after, retry_after = 1, base - now, new_tat - tolerance - now
        remaining = math.max(0, math.floor((tolerance - (base - now)) / interval))
      end
    end
  else
    local window_end = window_end_of(now, algorithm, interval)
    local used = 0
    local stored = redis.call("GET", key)
    if stored then
      local e, c = string.match(stored, "^(%d+) (%d+)$")
      if tonumber(e) == window_end then used = tonumber(c) end
    end
    reset_after = window_end - now
    if cost > capacity then
      v, retry_after, remaining = 2, 0, math.max(0, capacity - used)
    elseif used + cost <= capacity then
      v, retry_after, remaining = 0, 0, capacity - used - cost
      if cost > 0 then
        writes[#writes + 1] = {key, 2, string.format("%d %d", window_end, used + cost), reset_after}
        unspent[#unspent + 1] = {#out + 1, capacity - used, reset_after}
      end
    else
      v, retry_after, remaining = 1, reset_after, math.max(0, capacity - used)
    end
  end
  if v > verdict then verdict = v end
  out[#out + 1] = remaining
  out[#out + 1] = reset_after
  out[#out + 1] = retry_after
end

local lease_at = 3 + n * 4
local tally_at = lease_at
local lease_key, lease_ttl, lease_id
if ARGV[lease_at] and ARGV[lease_at] ~= "T" then
  tally_at = lease_at + 3
  local limit = tonumber(ARGV[lease_at])
  lease_ttl = tonumber(ARGV[lease_at + 1])
  lease_id = ARGV[lease_at + 2]
  lease_key = KEYS[n + 1]
  redis.call("ZREMRANGEBYSCORE", lease_key, "-inf", now)
  local held = redis.call("ZCARD", lease_key)
  local v, remaining, retry_after
  if limit < 1 then
    v, remaining, retry_after = 2, 0, 0
  elseif held < limit then
    v, remaining, retry_after = 0, limit - held - 1, 0
    if lease_ttl > 0 then unspent[#unspent + 1] = {#out + 1, limit - held, 0} end
  else
    v, remaining, retry_after = 1, 0, 1000000
  end
  if v > verdict then verdict = v end
  if lease_ttl == 0 then
    -- a read: report the free slots, take none
    lease_key = nil
    remaining = math.max(0, limit - held)
  end
  out[#out + 1] = remaining
  out[#out + 1] = 0
  out[#out + 1] = retry_after
end

out[1] = verdict
if verdict ~= 0 and ARGV[tally_at] == "T" then tally(tally_at) end
if verdict ~= 0 then
  -- Rejected: nothing is stored, so the limits that would have admitted report what is left.
  for _, u in ipairs(unspent) do
    out[u[1]] = u[2]
    out[u[1] + 1] = u[3]
  end
end
if verdict == 0 then
  for _, w in ipairs(writes) do
    local value = w[3]
    if expire then
      redis.call("SET", w[1], value, "PX", math.max(1, math.ceil(w[4] / 1000)))
    else
      redis.call("SET", w[1], value)
    end
  end
  if lease_key then
    redis.call("ZADD", lease_key, string.format("%d", now + lease_ttl), lease_id)
    if expire then
      local ttl_ms = math.ceil(lease_ttl / 1000)
      if redis.call("PTTL", lease_key) < ttl_ms then
        redis.call("PEXPIRE", lease_key, ttl_ms)
      end
    end
    out[2] = 1
  end
end
return out
