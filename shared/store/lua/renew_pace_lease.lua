-- Extends a concurrency lease still held.
-- KEYS[1]: the provider's concurrency leases. ARGV: lease id, lifetime (ms).
-- Returns 1 when renewed, 0 if the lease is gone.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 60000)
  return 1
end
return 0
