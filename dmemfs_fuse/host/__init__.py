"""The host: the daemon that builds and runs everything, the command line, mount options
and the plan made from them, systemd notification, man pages and the boot-time huge page
reservation.  The top layer."""
