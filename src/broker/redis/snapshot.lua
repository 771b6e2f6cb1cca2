-- A channel's epoch, last seq and stream entries from a seq on, read atomically. A channel that
-- does not exist yet gets its epoch now (kept for retire_ms unless an event arrives), so every
-- replica shows its subscribers the same one.
-- KEYS: log, meta   ARGV: from_seq, new_epoch, retire_ms
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'last_seq', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local last = redis.call('HGET', KEYS[2], 'last_seq') or '0'
return {epoch, last, redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+')}
