"""Scale-out: one replica's measured profile (`replica_profile`) and the discrete-event simulation of N replicas behind
a router (`simulate`)."""
