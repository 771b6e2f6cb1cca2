#!lua
-- Declared (a shebang, no allow-oom), so Redis checks maxmemory before the script runs: at
-- maxmemory it is refused whole (OOM) instead of stopping between its writes.
-- Sequences one event into its channel, atomically: dedupe by the given ids, the next seq, the
-- stream entry <seq>-0, the ledger counts, the live PUBLISH and the trim.
-- KEYS: log, meta, seen, delivered, offered
-- ARGV: body, now_ms, produced_ms or '', max_events, min_t, dedupe_min_t, new_epoch,
--       live_channel, seen_capacity, once ids...
local log, meta, seen, delivered, offered = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ARGV[6])
for i = 10, #ARGV do
  if redis.call('ZSCORE', seen, ARGV[i]) then
    return {0, '', 0, 0, 0}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[7]
  redis.call('HSET', meta, 'epoch', epoch)
end
local seq = redis.call('HINCRBY', meta, 'last_seq', 1)
redis.call('XADD', log, seq .. '-0', 'b', ARGV[1], 't', ARGV[2], 'p', ARGV[3])
redis.call('HINCRBY', meta, 'emitted', 1)
redis.call('HINCRBY', meta, 'pending', 1)
for i = 10, #ARGV do
  redis.call('ZADD', seen, ARGV[2], ARGV[i])
end
local capacity = tonumber(ARGV[9])
if redis.call('ZCARD', seen) > capacity then
  redis.call('ZREMRANGEBYRANK', seen, 0, -capacity - 1)
end
local message = epoch .. '\n' .. seq .. '\n' .. ARGV[2] .. '\n' .. ARGV[3] .. '\n' .. ARGV[1]
if redis.call('PUBLISH', ARGV[8], message) > 0 then
  redis.call('SADD', offered, seq)
end
local unseen, subscribed = trim(log, meta, delivered, offered, tonumber(ARGV[4]), tonumber(ARGV[5]))
for _, key in ipairs(KEYS) do
  redis.call('PERSIST', key)
end
return {1, epoch, seq, unseen, subscribed}
