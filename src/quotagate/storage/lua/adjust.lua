-- quotagate: charge (delta > 0) or refund (delta < 0) units on limits after the fact.
-- The twin of gcra_adjust / fixed_window_adjust in algorithms/*.py.
--
-- KEYS[1..n]  state key of each limit
-- ARGV[1]     now in microseconds, or "" to read the server's TIME
-- ARGV[2]     n
-- ARGV[3..]   4 per limit: algorithm (1 GCRA, 2 fixed window, 3 calendar window), capacity,
--             interval_us (a calendar window: its period code), delta
-- KEYS[n+1], ARGV[3+4n]  optional: a lease set and the id of a lease to release (ZREM), so
--             a finished request settles its tokens and gives its slot back in one call
-- then, optional: "T", ttl_ms, field, increment, ... added to a hash (its key last in KEYS):
--             the usage ledger, written by the same call
--
-- Returns {now_us, then per limit: remaining, reset_after_us}
-- GCRA charges are not clamped (debt is carried); refunds stop at a full bucket.

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
local out = {now}
local tail = 3 + 4 * n
if ARGV[tail] and ARGV[tail] ~= "T" then
  redis.call("ZREM", KEYS[n + 1], ARGV[tail])
  tail = tail + 1
end
if ARGV[tail] == "T" then tally(tail) end

for i = 1, n do
  local a = 3 + (i - 1) * 4
  local algorithm = tonumber(ARGV[a])
  local capacity = tonumber(ARGV[a + 1])
  local interval = tonumber(ARGV[a + 2])
  local delta = tonumber(ARGV[a + 3])
  local key = KEYS[i]
  local remaining, reset_after
  if algorithm == 1 then
    local tat
    local stored = redis.call("GET", key)
    if stored then
      -- "tat interval": a state written under another rate holds the same units at this one
      local t, written_at = string.match(stored, "^(%d+) (%d+)$")
      tat, written_at = tonumber(t), tonumber(written_at)
      -- (the adjustment below stores it)
      if tat and written_at ~= interval and tat > now then
        tat = now + math.ceil((tat - now) * interval / written_at)
      end
    end
    local base = now
    if tat and tat > now then base = tat end
    local new_tat = base + delta * interval
    if new_tat <= now then
      redis.call("DEL", key)
      remaining, reset_after = capacity, 0
    else
      reset_after = new_tat - now
      remaining = math.max(0, math.floor((capacity * interval - reset_after) / interval))
      local value = string.format("%d %d", new_tat, interval)
      if expire then
        redis.call("SET", key, value, "PX", math.max(1, math.ceil(reset_after / 1000)))
      else
        redis.call("SET", key, value)
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
    local count = math.max(0, used + delta)
    reset_after = window_end - now
    remaining = math.max(0, capacity - count)
    local value = string.format("%d %d", window_end, count)
    if expire then
      redis.call("SET", key, value, "PX", math.max(1, math.ceil(reset_after / 1000)))
    else
      redis.call("SET", key, value)
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset_after
end
return out
