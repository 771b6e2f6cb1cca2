#!lua
-- A new epoch for a channel a replica mirrored under seen_epoch when Redis no longer holds what it
-- saw: the channel's keys are gone (Redis restarted without persistence, or retired the channel) or
-- its last_seq went back (a failover lost the latest writes). No seq is ever reused in one epoch,
-- and the subscribers are told, in the epoch the next event will carry, that they did not recover.
-- Only called for a channel that had an epoch, so a channel nobody published to still gets no key;
-- a renewed channel without events expires after retire_ms. Returns the channel's epoch now.
-- KEYS: meta   ARGV: seen_epoch, seen_last_seq, new_epoch, retire_ms
-- The new epoch belongs to this Redis process (see publish.lua).
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'last_seq', 0, 'run', run)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return ARGV[3]
end
local last = redis.call('HGET', KEYS[1], 'last_seq') or '0'
if epoch == ARGV[1] and tonumber(last) < tonumber(ARGV[2]) then
  -- The new epoch's acks start above the last seq here (see publish.lua).
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'run', run, 'acked_seq', last)
  return ARGV[3]
end
return epoch
