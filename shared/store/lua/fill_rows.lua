-- Writes error rows for the lines that have none yet, while the batch accepts rows.
-- batch record: KEYS[1]
-- KEYS: the batch record, the rows hash, the done bitmap. ARGV: line/row pairs.
-- Returns how many rows were added, or -1 once the batch no longer accepts rows.

local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'in_progress' and st ~= 'cancelling' then return -1 end
local added, bytes = 0, 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 and redis.call('SETBIT', KEYS[3], ARGV[i], 1) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    added = added + 1
    bytes = bytes + #ARGV[i + 1]
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[1], 'failed', added)
  redis.call('HINCRBY', KEYS[1], 'pend_n', added)
  redis.call('HINCRBY', KEYS[1], 'pend_b', bytes)
end
return added
