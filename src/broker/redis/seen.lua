#!lua
-- What the replicas last saw of runs, for one or more runs of one slot: each run's key holds its
-- last publish ms (`end:<ms>` once it ended) for `ttl` ms.
-- KEYS: each run's activity key   ARGV: ttl, then each run's value in turn
for k = 1, #KEYS do
  redis.call('SET', KEYS[k], ARGV[k + 1], 'PX', ARGV[1])
end
return #KEYS
