"""Control and insight: the control socket, reporting, metrics, the pool picture and
dmemctl.  They read the layers below and act on them through their own methods."""
