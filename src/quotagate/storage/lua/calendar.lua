-- quotagate: included by decide.lua and adjust.lua where they say "--@include calendar".
-- The end of a calendar period (algorithm 3: ``interval`` is its code: hour 1, day 2, week 3,
-- month 4, year 5), in UTC. The twin of algorithms/calendar.py (days_from_civil, civil_from_days).
local US_DAY = 86400000000
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mm = m + 9
  if m > 2 then mm = m - 3 end
  local doy = math.floor((153 * mm + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function calendar_end(now, code)
  if code == 1 then return (math.floor(now / 3600000000) + 1) * 3600000000 end
  if code == 2 then return (math.floor(now / US_DAY) + 1) * US_DAY end
  if code == 3 then
    local monday = 4 * US_DAY
    return (math.floor((now - monday) / (7 * US_DAY)) + 1) * 7 * US_DAY + monday
  end
  local z = math.floor(now / US_DAY) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  if code == 4 then
    if m == 12 then return days_from_civil(y + 1, 1, 1) * US_DAY end
    return days_from_civil(y, m + 1, 1) * US_DAY
  end
  return days_from_civil(y + 1, 1, 1) * US_DAY
end
-- The end of the fixed window (algorithm 2: of length interval) or the calendar period
-- (algorithm 3) holding now.
local function window_end_of(now, algorithm, interval)
  if algorithm == 3 then return calendar_end(now, interval) end
  return (math.floor(now / interval) + 1) * interval
end
