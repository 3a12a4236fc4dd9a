"""The PostgreSQL warehouse: connections, migrations, staging and the atomic commit of a batch."""
