-- Gate before the upstream calls of lines of one batch: a call starts only while the batch is
-- `in_progress` with no stop requested, and is recorded in flight so cancel and expiry wait for it.
-- batch record: KEYS[1]
-- KEYS: the batch record, the done bitmap, the in-flight hash, the rows hash.
-- ARGV: the calls' deadline (unix ms), then the lines.
-- Returns {'stopped'}, or one 'go' or 'dup' (the line has a row already) per line.

local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if not st[1] or st[1] ~= 'in_progress' or st[2] then return {'stopped'} end
local out = {}
for i = 2, #ARGV do
  if redis.call('GETBIT', KEYS[2], ARGV[i]) == 1 or redis.call('HEXISTS', KEYS[4], ARGV[i]) == 1 then
    out[#out + 1] = 'dup'
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
    out[#out + 1] = 'go'
  end
end
return out
