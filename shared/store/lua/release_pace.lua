-- Reports calls' outcome to a provider's limiter: frees the lease, corrects the token bucket,
-- learns the ratio of actual to estimated tokens, applies AIMD to the concurrency limit, feeds
-- the breaker and sets a fleet pause.
-- KEYS: as acquire_pace.lua.
-- ARGV: lease id, outcome, max concurrency, token correction, ms per token, breaker failures,
-- breaker cooldown (ms), fleet pause (ms), estimated tokens, actual tokens (`-1`: unknown),
-- calls summed into this report.
-- Returns {breaker state, whether it changed, concurrency limit}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, outcome, maxc = ARGV[1], ARGV[2], tonumber(ARGV[3])
local delta, ti = tonumber(ARGV[4]), tonumber(ARGV[5])
local threshold, cooldown, pause_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local estimate, actual = tonumber(ARGV[9]), tonumber(ARGV[10])
-- calls summed into this report (estimate and actual are their sums)
local samples = tonumber(ARGV[11] or '1') or 1
-- lease and AIMD
local lim = 0
if maxc > 0 then
  redis.call('ZREM', KEYS[4], lease)
  local a = redis.call('HMGET', KEYS[5], 'limit', 'dec_at')
  lim = tonumber(a[1] or '') or maxc
  if outcome == 'throttled' then
    if now - (tonumber(a[2] or '') or 0) >= 1000 then
      lim = math.max(1, lim / 2)
      redis.call('HSET', KEYS[5], 'limit', string.format('%.4f', lim), 'dec_at', now)
    end
  elseif outcome == 'ok' and lim < maxc then
    lim = math.min(maxc, lim + 1 / math.max(1, lim))
    redis.call('HSET', KEYS[5], 'limit', string.format('%.4f', lim))
  end
  redis.call('PEXPIRE', KEYS[5], 3600000)
end
-- token correction, and the ratio of actual to estimated tokens that scales later charges
if ti > 0 and actual >= 0 and estimate > 0 then
  local ratio = tonumber(redis.call('HGET', KEYS[5], 'tk_ratio') or '') or 1
  -- one call moves the average by a bounded step, whatever it reports
  local sample = math.min(ratio * 4, math.max(ratio / 4, actual / estimate))
  -- n samples move the average as n single steps of 0.2 would if they were alike
  local step = 1 - 0.8 ^ math.max(1, samples)
  ratio = math.min(4, math.max(0.02, ratio + step * (sample - ratio)))
  redis.call('HSET', KEYS[5], 'tk_ratio', string.format('%.4f', ratio))
  redis.call('PEXPIRE', KEYS[5], 3600000)
end
if ti > 0 and delta ~= 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '') or now
  local n = tat + delta * ti
  if delta < 0 then n = math.max(n, now) end
  redis.call('SET', KEYS[2], string.format('%.3f', n), 'PX', math.max(0, math.ceil(n - now)) + 60000)
end
-- fleet pause
if pause_ms > 0 then
  local cur = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  if now + pause_ms > cur then
    redis.call('SET', KEYS[3], now + pause_ms, 'PX', pause_ms)
  end
end
-- breaker
local st = redis.call('HGET', KEYS[6], 'state') or 'closed'
local changed = 0
if outcome == 'fail' then
  local fails = redis.call('HINCRBY', KEYS[6], 'fails', 1)
  if st == 'half' or (st == 'closed' and fails >= threshold) then
    redis.call('HSET', KEYS[6], 'state', 'open', 'until', now + cooldown, 'probes', 0)
    st = 'open'
    changed = 1
  end
elseif outcome == 'oks' then
  -- successes summed over a while: they reset the failure count, but calls that started before
  -- the breaker opened do not close it (only its probes do)
  if st == 'closed' then redis.call('HSET', KEYS[6], 'fails', 0) end
elseif outcome == 'ok' or outcome == 'throttled' then
  if st == 'half' then
    redis.call('HSET', KEYS[6], 'state', 'closed', 'fails', 0, 'probes', 0)
    st = 'closed'
    changed = 1
  elseif st == 'closed' then
    redis.call('HSET', KEYS[6], 'fails', 0)
  end
end
redis.call('PEXPIRE', KEYS[6], 86400000)
return {st, changed, math.floor(lim)}
