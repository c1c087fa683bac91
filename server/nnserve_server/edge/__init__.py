"""The gRPC edge: servicers, the status guard, auth, TLS, tracing, health, and the app that assembles them."""
