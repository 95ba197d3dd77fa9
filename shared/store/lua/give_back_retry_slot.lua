-- Removes a child from its parent's retries (its creation failed after the slot was taken).
-- batch record: KEYS[1]
-- KEYS[1]: the parent's batch record. ARGV[1]: child id.
-- Returns 1, or 0 when the parent lists no retries.

local cur = redis.call('HGET', KEYS[1], 'retries')
if not cur then return 0 end
local kept = {}
for id in string.gmatch(cur, '[^,]+') do
  if id ~= ARGV[1] then table.insert(kept, id) end
end
redis.call('HSET', KEYS[1], 'retries', table.concat(kept, ','))
return 1
