-- A channel's epoch, last seq and stream entries from a seq on, read atomically. A channel that
-- does not exist yet gets its epoch now (kept for retire_ms unless an event arrives), so every
-- replica shows its subscribers the same one.
-- A channel whose last_seq went back below what a replica already saw under the same epoch (a
-- failover that lost the latest writes) gets a new epoch too, so no seq is ever reused in one epoch.
-- KEYS: log, meta   ARGV: from_seq, new_epoch, retire_ms, seen_epoch, seen_last_seq
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch and epoch == ARGV[4]
    and tonumber(redis.call('HGET', KEYS[2], 'last_seq') or '0') < tonumber(ARGV[5]) then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'last_seq', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local last = redis.call('HGET', KEYS[2], 'last_seq') or '0'
return {epoch, last, redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+')}
