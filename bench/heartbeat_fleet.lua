-- wrk script: POST /v1/instances for INSTANCES distinct instances (default 300,000) spread
-- over SERVICES services (default 100, named hb-0 … hb-N), each id once per cycle.
local counter = 0
local token = os.getenv("TOKEN") or "bench-admin-token"
local instances = tonumber(os.getenv("INSTANCES") or "300000")
local services = tonumber(os.getenv("SERVICES") or "100")
request = function()
  local id = counter % instances
  counter = counter + 1
  local body = '{"instance_id":"inst-' .. id .. '","service":"hb-' .. (id % services) ..
    '","version_id":"3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f"}'
  return wrk.format("POST", "/v1/instances",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
