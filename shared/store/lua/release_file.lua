-- Unlists a file and gives back the bytes it was counted for, once.
-- KEYS: the tenant's file listing, its usage hash, its counted-bytes hash. ARGV[1]: id.
-- Returns 1 when bytes were given back, 0 if the file was not counted.

redis.call('ZREM', KEYS[1], ARGV[1])
local bytes = redis.call('HGET', KEYS[3], ARGV[1])
if not bytes then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'bytes', -tonumber(bytes))
redis.call('HINCRBY', KEYS[2], 'files', -1)
return 1
