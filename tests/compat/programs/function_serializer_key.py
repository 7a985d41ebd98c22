"""numpy.array (a function) registered beside numpy.ndarray, as real code does;
the serializers after it keep the type ids of the original."""

import numpy

import aiomas


def ndarray_serializer():
    return numpy.ndarray, lambda a: a.tolist(), numpy.array


def array_function_serializer():
    return numpy.array, lambda a: a.tolist(), numpy.array


@aiomas.codecs.serializable
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, value):
        return value


serializers = [ndarray_serializer, array_function_serializer, Point.__serializer__]
one = aiomas.Container.create(("127.0.0.1", 0), extra_serializers=serializers)
two = aiomas.Container.create(("127.0.0.1", 0), extra_serializers=serializers)
echo = Echo(one)
codec = aiomas.JSON()
for factory in [aiomas.util.arrow_serializer, *serializers]:
    codec.add_serializer(*factory())
print(codec.encode(Point(1, 2)))


async def call():
    proxy = await two.connect(echo.addr)
    array = await proxy.echo(numpy.arange(3))
    point = await proxy.echo(Point(5, 6))
    return type(array).__name__, array.tolist(), point.x, point.y


print(aiomas.run(call()))
one.shutdown()
two.shutdown()
print("done")
