-- wrk script: POST /v1/instances with 10,000 distinct instance ids, cycling.
local counter = 0
local token = os.getenv("TOKEN") or "bench-admin-token"
request = function()
  counter = counter + 1
  local id = counter % 10000
  local body = '{"instance_id":"inst-' .. id .. '","service":"hb","version_id":"3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f"}'
  return wrk.format("POST", "/v1/instances",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
