-- Deletes a file record unless a batch still reads it.
-- KEYS: the file record, the file's users set.
-- Returns up to ten ids of the batches reading it (nothing deleted), or {} once deleted.

local users = redis.call('ZRANGE', KEYS[2], 0, 9)
if #users > 0 then return users end
redis.call('DEL', KEYS[1], KEYS[2])
return {}
