-- Counts a line's request and tokens toward a tenant's budget windows, once per line whatever
-- its redeliveries, refusing a line not yet counted when a limit is reached.
-- KEYS: day hash, month hash, the batch's billed bitmap. ARGV: line, tokens to add, admit flag
-- (`1`: refuse a line not yet counted when a limit is reached), the request/day, token/day and
-- token/month limits (`-1` = none), then the expiries (unix ms) of the three keys.
-- Returns {0, requests counted, tokens counted}, or {1, day requests, day tokens, month
-- requests, month tokens} when refused.

local rbit = tonumber(ARGV[1]) * 2
local counted = redis.call('GETBIT', KEYS[3], rbit) == 1
if ARGV[3] == '1' and not counted then
  local d = redis.call('HMGET', KEYS[1], 'requests', 'tokens')
  local m = redis.call('HMGET', KEYS[2], 'requests', 'tokens')
  local dr, dt = tonumber(d[1] or '0'), tonumber(d[2] or '0')
  local mr, mt = tonumber(m[1] or '0'), tonumber(m[2] or '0')
  local function over(used, limit)
    limit = tonumber(limit)
    return limit >= 0 and used >= limit
  end
  if over(dr, ARGV[4]) or over(dt, ARGV[5]) or over(mt, ARGV[6]) then
    return {1, dr, dt, mr, mt}
  end
end
local requests, tokens = 0, 0
if not counted then
  redis.call('SETBIT', KEYS[3], rbit, 1)
  redis.call('HINCRBY', KEYS[1], 'requests', 1)
  redis.call('HINCRBY', KEYS[2], 'requests', 1)
  requests = 1
end
local add = tonumber(ARGV[2])
if add > 0 and redis.call('SETBIT', KEYS[3], rbit + 1, 1) == 0 then
  redis.call('HINCRBY', KEYS[1], 'tokens', add)
  redis.call('HINCRBY', KEYS[2], 'tokens', add)
  tokens = add
end
if requests + tokens > 0 then
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
  redis.call('PEXPIREAT', KEYS[2], ARGV[8])
  redis.call('PEXPIREAT', KEYS[3], ARGV[9])
end
return {0, requests, tokens}
