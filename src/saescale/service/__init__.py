"""The service on Ray: starting or joining Ray, the Ray Data stream and the Ray Train driver and workers. The only place (with the sweeps backend) that imports Ray."""
