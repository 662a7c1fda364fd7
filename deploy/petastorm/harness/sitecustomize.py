# make test-petastorm puts this folder on PYTHONPATH: the Spark workers its tests start unpickle
# functions of petastorm.tests.test_common, so they need the same shims as the pytest process.
import test_shims  # noqa: F401
