-- Reserves start times for calls to one provider: circuit breaker, fleet pause, adaptive
-- concurrency, then the request and token rates (GCRA, reservation form).
-- KEYS: request TAT, token TAT, fleet pause, concurrency leases, AIMD state, breaker (all under
-- the provider's hash tag).
-- ARGV: ms per request, ms per token, the calls' estimated token costs (joined by `,`), request
-- tolerance, max concurrency, lease id, lease lifetime (ms), longest wait reserved ahead (ms),
-- breaker cooldown (ms), breaker probes, token tolerance, largest token charge.
-- Returns {'go', wait of the calls not granted, probe flag, {wait, charged tokens, ...}}, or
-- {'open'|'paused'|'busy'|'rate', wait (ms), concurrency limit, {}}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ri, ti, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local maxc, lease, lease_ms, hold = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local cooldown, probes_max, tburst = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local max_charge = tonumber(ARGV[12])
-- the estimated token costs of the calls asking, in order (one reservation each)
local costs = {}
for c in string.gmatch(ARGV[3], '[^,]+') do costs[#costs + 1] = tonumber(c) end
-- circuit breaker
local probe = 0
local b = redis.call('HMGET', KEYS[6], 'state', 'until', 'probes')
if b[1] == 'open' then
  local untl = tonumber(b[2]) or 0
  if now < untl then return {'open', untl - now, 0, {}} end
  redis.call('HSET', KEYS[6], 'state', 'half', 'probes', 0, 'until', now + cooldown)
  b = {'half', tostring(now + cooldown), '0'}
end
if b[1] == 'half' then
  local probes = tonumber(b[3]) or 0
  if now >= (tonumber(b[2]) or 0) then
    -- probes that never reported (their worker died): let new ones through
    probes = 0
    redis.call('HSET', KEYS[6], 'probes', 0, 'until', now + cooldown)
  end
  if probes >= probes_max then return {'open', 250, 0, {}} end
  probe = 1
end
-- fleet pause
local pause = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if pause > now then return {'paused', pause - now, 0, {}} end
-- adaptive concurrency (one lease per call: a call holding a lease asks alone)
local lim = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  lim = tonumber(redis.call('HGET', KEYS[5], 'limit') or '') or maxc
  lim = math.max(1, math.min(maxc, math.floor(lim)))
  if redis.call('ZCARD', KEYS[4]) >= lim then return {'busy', 50, lim, {}} end
end
-- a half-open breaker hands out one probe per ask
local n = #costs
if probe == 1 or maxc > 0 then n = math.min(n, 1) end
-- rates (GCRA, reservation form), one reservation after another as if asked one by one; the
-- token cost is the estimate scaled by the provider's learnt ratio of actual to estimated tokens
local ratio = 1
if ti > 0 then ratio = tonumber(redis.call('HGET', KEYS[5], 'tk_ratio') or '') or 1 end
local rtat, ttat = 0, 0
if ri > 0 then rtat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0 end
if ti > 0 then ttat = tonumber(redis.call('GET', KEYS[2]) or '0') or 0 end
local granted, rest = {}, 0
for i = 1, n do
  local charged = 0
  if ti > 0 then charged = math.min(max_charge, math.max(1, math.floor(costs[i] * ratio + 0.5))) end
  local s = now
  if ri > 0 then s = math.max(s, rtat - burst) end
  if ti > 0 then s = math.max(s, ttat - tburst) end
  local wait = s - now
  if wait > hold then
    rest = math.ceil(wait)
    break
  end
  if ri > 0 then rtat = math.max(rtat, s) + ri end
  if ti > 0 then ttat = math.max(ttat, s) + ti * charged end
  granted[#granted + 1] = math.ceil(wait)
  granted[#granted + 1] = charged
end
if #granted == 0 then return {'rate', rest, 0, {}} end
if ri > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', rtat), 'PX', math.ceil(rtat - now) + 60000)
end
if ti > 0 then
  redis.call('SET', KEYS[2], string.format('%.3f', ttat), 'PX', math.ceil(ttat - now) + 60000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[4], now + granted[1] + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[4], granted[1] + lease_ms + 60000)
end
if probe == 1 then redis.call('HINCRBY', KEYS[6], 'probes', 1) end
-- what the calls not granted wait for: the rate, or the breaker's one probe per ask
if rest == 0 and probe == 1 then rest = -250 end
return {'go', rest, probe, granted}
