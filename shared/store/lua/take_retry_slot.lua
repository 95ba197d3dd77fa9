-- Lists a child batch among its parent's retries unless the parent lists the most allowed.
-- batch record: KEYS[1]
-- KEYS[1]: the parent's batch record. ARGV: child id, most children.
-- Returns 'ok', 'full', or 'gone' when the parent's record is gone.

if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
local cur = redis.call('HGET', KEYS[1], 'retries')
local n = 0
if cur and cur ~= '' then
  for _ in string.gmatch(cur, '[^,]+') do n = n + 1 end
end
if n >= tonumber(ARGV[2]) then return 'full' end
if cur and cur ~= '' then cur = cur .. ',' .. ARGV[1] else cur = ARGV[1] end
redis.call('HSET', KEYS[1], 'retries', cur)
return 'ok'
