-- Moves a batch to a new status if the transition table allows it, stamping the status's `*_at`
-- once and setting extra fields in the same atomic step. A stop in progress refuses the
-- statuses that would carry the batch on (in_progress, finalizing, cancelling).
-- batch record: KEYS[1]
-- KEYS[1]: the batch record.
-- ARGV: the new status, the statuses it may come from (joined by `,`), the `*_at` field and its
-- value, then extra field/value pairs.
-- Returns {'ok', previous status}, {'refused', current status} or {'gone', ''}.

local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if not st[1] then return {'gone', ''} end
local to = ARGV[1]
if (to == 'in_progress' or to == 'finalizing' or to == 'cancelling') and st[2] then return {'refused', st[1]} end
local from_ok = false
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if st[1] == allowed then from_ok = true end
end
if not from_ok then return {'refused', st[1]} end
redis.call('HSET', KEYS[1], 'status', to)
redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {'ok', st[1]}
