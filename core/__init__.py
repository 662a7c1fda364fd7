"""What the Spark side (sparkml) and the torch side (dl) both use, with no Spark import of its
own: storage (URIs; driver I/O through Hadoop's FileSystem of a session it is handed; pyarrow.fs
reads and writes for executors and training processes)."""
