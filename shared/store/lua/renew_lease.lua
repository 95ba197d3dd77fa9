-- Extends a lease still held with the caller's token.
-- KEYS[1]: the lease key. ARGV: the token, the new lifetime (ms).
-- Returns 1 when renewed, 0 if the lease was lost.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
