-- Binds a key still claimed with the caller's token to the response.
-- KEYS[1]: the idempotency key. ARGV: the caller's token, the response record, its retention (ms).
-- Returns 1 when recorded, 0 if the claim was lost (nothing written).

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
