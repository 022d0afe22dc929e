"""Support for the auth middlewares: identity forwarding, audit of refusals, credential
stores and key sets. The middlewares themselves live in `fastgate.middleware`."""
