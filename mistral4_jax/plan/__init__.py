"""Planning a deployment without the hardware: memory per device (`memory`), compiled figures (`compile`)."""
