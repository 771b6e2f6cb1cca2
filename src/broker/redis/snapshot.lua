#!lua flags=no-writes
-- A channel's epoch, last seq and stream entries from a seq on, read atomically. It only reads, so
-- subscribing creates no key: a channel nobody published to has no epoch yet ('') and last seq 0,
-- and the first publish gives it one (see renew.lua for a channel Redis lost).
-- KEYS: log, meta   ARGV: from_seq
local epoch = redis.call('HGET', KEYS[2], 'epoch') or ''
local last = redis.call('HGET', KEYS[2], 'last_seq') or '0'
return {epoch, last, redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+')}
