"""JSON-RPC methods, one module per area; each registers with rpc.method."""
