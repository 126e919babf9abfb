"""FlexVolume front end: kubelet argv in, exactly one JSON object out; the relay client that hands the call
to the warm node agent. Translates only: the work is the engine's."""
