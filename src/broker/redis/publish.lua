#!lua
-- Declared (a shebang, no allow-oom), so Redis checks maxmemory before the script runs: at
-- maxmemory it is refused whole (OOM) instead of stopping between its writes.
-- Sequences one event into its channel, atomically: dedupe by the given ids, the next seq, the
-- stream entry <seq>-0, the ledger counts, the live PUBLISH and the trim.
-- KEYS: log, meta, seen, delivered, offered
-- ARGV: body, now_ms, produced_ms or '', max_events, min_t, dedupe_min_t, new_epoch,
--       live_channel, seen_capacity, PUBLISH or SPUBLISH (Redis Cluster: sharded pub/sub, the
--       live channel is in this channel's slot), once ids...
local log, meta, seen, delivered, offered = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ARGV[6])
for i = 11, #ARGV do
  if redis.call('ZSCORE', seen, ARGV[i]) then
    return {0, '', 0, 0, 0}
  end
end
-- An epoch belongs to the Redis process that wrote it (run_id, new at every start and on every
-- failover): one that came back from an RDB or AOF file, or a promoted replica, may lack the latest
-- writes, and some replica may already have delivered their seqs. Nothing here can tell, so the
-- first publish in another process starts a new epoch rather than hand out those seqs again. A
-- channel written before `run` existed adopts this process.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local epoch = redis.call('HGET', meta, 'epoch')
local writer = redis.call('HGET', meta, 'run')
if not epoch or (writer and writer ~= run) then
  epoch = ARGV[7]
  -- An ack that reached the old epoch past what this process holds must not hide the new
  -- epoch's acks: they start above the last seq here.
  local last = redis.call('HGET', meta, 'last_seq') or '0'
  redis.call('HSET', meta, 'epoch', epoch, 'run', run, 'acked_seq', last)
elseif not writer then
  redis.call('HSET', meta, 'run', run)
end
local seq = redis.call('HINCRBY', meta, 'last_seq', 1)
redis.call('XADD', log, seq .. '-0', 'b', ARGV[1], 't', ARGV[2], 'p', ARGV[3])
redis.call('HINCRBY', meta, 'emitted', 1)
redis.call('HINCRBY', meta, 'pending', 1)
for i = 11, #ARGV do
  redis.call('ZADD', seen, ARGV[2], ARGV[i])
end
local capacity = tonumber(ARGV[9])
if redis.call('ZCARD', seen) > capacity then
  redis.call('ZREMRANGEBYRANK', seen, 0, -capacity - 1)
end
local message = epoch .. '\n' .. seq .. '\n' .. ARGV[2] .. '\n' .. ARGV[3] .. '\n' .. ARGV[1]
if redis.call(ARGV[10], ARGV[8], message) > 0 then
  redis.call('SADD', offered, seq)
end
local unseen, subscribed = trim(log, meta, delivered, offered, tonumber(ARGV[4]), tonumber(ARGV[5]))
for _, key in ipairs(KEYS) do
  redis.call('PERSIST', key)
end
return {1, epoch, seq, unseen, subscribed}
