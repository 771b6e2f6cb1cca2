#!lua
-- Declared (a shebang, no allow-oom), so Redis checks maxmemory before the script runs: at
-- maxmemory it is refused whole (OOM) instead of stopping between its writes.
-- Sequences events into one channel, in their order, atomically: for each, dedupe by its ids, the
-- next seq, the stream entry <seq>-0, the ledger counts and the live PUBLISH; then the trim.
-- KEYS: log, meta, seen, delivered, offered
-- ARGV: now_ms, max_events, min_t, dedupe_min_t, new_epoch, live_channel, seen_capacity,
--       PUBLISH or SPUBLISH (Redis Cluster: sharded pub/sub, the live channel is in this
--       channel's slot), then for each event: body, produced_ms or '', how many once ids, the ids
-- Returns one string, 'epoch unseen subscribed seq...' (a seq per event, 0 for a duplicate; epoch
-- is '' when every event was a duplicate): one value to read instead of a nested array of them.
local log, meta, seen, delivered, offered = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, capacity, live, publish = ARGV[1], tonumber(ARGV[7]), ARGV[6], ARGV[8]
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ARGV[4])

-- An epoch belongs to the Redis process that wrote it (run_id, new at every start and on every
-- failover): one that came back from an RDB or AOF file, or a promoted replica, may lack the latest
-- writes, and some replica may already have delivered their seqs. Nothing here can tell, so the
-- first publish in another process starts a new epoch rather than hand out those seqs again. A
-- channel written before `run` existed adopts this process.
local function current_epoch()
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local epoch = redis.call('HGET', meta, 'epoch')
  local writer = redis.call('HGET', meta, 'run')
  if not epoch or (writer and writer ~= run) then
    epoch = ARGV[5]
    -- An ack that reached the old epoch past what this process holds must not hide the new
    -- epoch's acks: they start above the last seq here.
    local last = redis.call('HGET', meta, 'last_seq') or '0'
    redis.call('HSET', meta, 'epoch', epoch, 'run', run, 'acked_seq', last)
  elseif not writer then
    redis.call('HSET', meta, 'run', run)
  end
  return epoch
end

local epoch = nil
local seqs, published = {}, 0
local i = 9
while i <= #ARGV do
  local body, produced, first, last = ARGV[i], ARGV[i + 1], i + 3, i + 2 + tonumber(ARGV[i + 2])
  i = last + 1
  local duplicate = false
  for j = first, last do
    if redis.call('ZSCORE', seen, ARGV[j]) then
      duplicate = true
      break
    end
  end
  if duplicate then
    seqs[#seqs + 1] = 0
  else
    epoch = epoch or current_epoch()
    local seq = redis.call('HINCRBY', meta, 'last_seq', 1)
    redis.call('XADD', log, seq .. '-0', 'b', body, 't', now, 'p', produced)
    for j = first, last do
      redis.call('ZADD', seen, now, ARGV[j])
    end
    if redis.call('ZCARD', seen) > capacity then
      redis.call('ZREMRANGEBYRANK', seen, 0, -capacity - 1)
    end
    local message = epoch .. '\n' .. seq .. '\n' .. now .. '\n' .. produced .. '\n' .. body
    if redis.call(publish, live, message) > 0 then
      redis.call('SADD', offered, seq)
    end
    seqs[#seqs + 1] = seq
    published = published + 1
  end
end
if not epoch then
  return ' 0 0 ' .. table.concat(seqs, ' ')
end
redis.call('HINCRBY', meta, 'emitted', published)
redis.call('HINCRBY', meta, 'pending', published)
local unseen, subscribed = trim(log, meta, delivered, offered, tonumber(ARGV[2]), tonumber(ARGV[3]))
-- An idle channel's keys were given a TTL together (sweep.lua): this one is in use again.
if redis.call('PTTL', meta) >= 0 then
  for _, key in ipairs(KEYS) do
    redis.call('PERSIST', key)
  end
end
return epoch .. ' ' .. unseen .. ' ' .. subscribed .. ' ' .. table.concat(seqs, ' ')
