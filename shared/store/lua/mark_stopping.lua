-- Asks a `validating` or `in_progress` batch to stop, unless it already stops.
-- batch record: KEYS[1]
-- KEYS[1]: the batch record. ARGV[1]: the stop reason.
-- Returns 1 when the stop was recorded, 0 otherwise.

local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if st[2] then return 0 end
if st[1] ~= 'validating' and st[1] ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'stopping', ARGV[1])
return 1
