-- Records that a batch reads a file, if the file belongs to the batch's tenant and has not expired.
-- KEYS: the file record, the file's users set.
-- ARGV: batch id, tenant, now (unix ms, the entry's score), now (unix s).
-- Returns 1 when recorded, 0 otherwise.

local f = redis.call('HMGET', KEYS[1], 'tenant', 'expires_at')
if f[1] ~= ARGV[2] then return 0 end
if f[2] and tonumber(f[2]) <= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
