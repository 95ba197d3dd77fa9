-- Lists a file and counts it, unless it is listed already or (with limits) it would take the
-- tenant past them.
-- KEYS: the tenant's file listing, its usage hash, its counted-bytes hash.
-- ARGV: id, listing position, bytes, byte limit, file limit (`-1`: none).
-- Returns {verdict, bytes used, files}, verdict one of 'ok', 'listed', 'files', 'bytes'.

local u = redis.call('HMGET', KEYS[2], 'bytes', 'files')
local used, files = tonumber(u[1] or '0'), tonumber(u[2] or '0')
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'listed', used, files} end
local bytes, max_bytes, max_files = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if max_files >= 0 and files + 1 > max_files then return {'files', used, files} end
if max_bytes >= 0 and used + bytes > max_bytes then return {'bytes', used, files} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[2], 'bytes', bytes)
redis.call('HINCRBY', KEYS[2], 'files', 1)
return {'ok', used + bytes, files + 1}
